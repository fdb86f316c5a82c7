"""Hostile and real-world inputs to inference and model loading (issue 11): each case feeds the
exact input and checks the outcome: the one-line error (and exit code, through the command
line), or what was loaded.

1. image size: a 10000 x 10000 JPEG decodes at 1/8 scale (boxes stay in the file's pixels) in
   modest memory; an image over the pixel cap is refused from its header, before decoding;
2. boxes files: xyxy / xywh lists, Visual Genome region objects, COCO detection results,
   densecap's results.json; a bad file is one line and the model is never built;
3. ``model.weights``: DDP's ``module.`` prefix, ``{"model": ...}`` / ``{"state_dict": ...}``
   wrappers, a trunk without its classifier; missing trunk keys, pickles and long key lists;
4. bad checkpoints: refused in one line before Ray starts (``dvsa evaluate``), and a YAML
   syntax error in a checkpoint's config named by ``evaluate``, ``caption`` and ``search``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torchvision
from eval_fixtures import ROOT, chain_captioner, save
from PIL import Image, ImageDraw

from dvsa.cli import main
from dvsa.errors import DataError, DvsaError
from dvsa.inference.own_images import MAX_MEGAPIXELS, decode_reduced, model_input, open_image, picture
from dvsa.models.encoder import ImageEncoder
from dvsa.text import Vocab

WORDS = ["a", "red", "circle", "blue", "square"]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny captioner that says "red circle" for every box."""
    from dvsa.config import load_config

    d = tmp_path_factory.mktemp("hostile_ckpt")
    vocab = Vocab.build({w: 10 - i for i, w in enumerate(WORDS)}, 1, 20)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["task=caption", "caption.cell=rnn", "model.word_dim=16",
                                                       "model.hidden_dim=16", "data.image_size=32", f"out={d}"])
    return save(chain_captioner(cfg, vocab, ["red", "circle"]), vocab, cfg, d / "ckpt")


@pytest.fixture()
def scene(tmp_path) -> Path:
    im = Image.new("RGB", (120, 90), (128, 128, 128))
    ImageDraw.Draw(im).ellipse([10, 10, 50, 50], fill=(220, 30, 30))
    p = tmp_path / "scene.jpg"
    im.save(p, quality=90)
    return p


@pytest.fixture()
def no_model(monkeypatch):
    """The model loader of `dvsa caption`, failing the test if anything calls it."""
    from dvsa.inference.captioning import BoxCaptioner

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(BoxCaptioner, "from_checkpoint", classmethod(refuse))


# =========================================================================== 1. image size


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    """A 10000 x 10000 solid-colour JPEG (1.5 MB), made in a child process so that its 300 MB
    of pixels never sit in the test process."""
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    subprocess.run([sys.executable, "-c", "import sys; from PIL import Image; "
                    "Image.new('RGB', (10000, 10000), (200, 30, 30)).save(sys.argv[1], quality=75)", str(path)],
                   check=True)
    return path


def test_a_10000_px_jpeg_decodes_at_one_eighth_scale(big_jpeg):
    image = open_image(str(big_jpeg))
    assert (image.format, image.width, image.height) == ("JPEG", 10000, 10000)
    assert decode_reduced(str(big_jpeg), (224, 224)).size == (1250, 1250)      # libjpeg's 1/8 DCT scaling
    assert decode_reduced(str(big_jpeg), (2000, 2000)).size == (2500, 2500)    # 1/4 keeps both sides >= 2000
    pixels = model_input(image, 224)
    assert pixels.shape == (3, 224, 224)
    assert [int(v) for v in pixels[:, 100, 100]] == pytest.approx((200, 30, 30), abs=3)
    drawn, boxes = picture(image, [[1000.0, 1000.0, 6000.0, 5000.0]])           # boxes in the file's pixels
    assert drawn.size == (1024, 1024) and boxes == [pytest.approx([102.4, 102.4, 614.4, 512.0])]


def _caption_in_a_child(checkpoint: Path, image: Path, boxes: Path, out: Path) -> tuple[str, int]:
    """`dvsa caption` in a child process: (its stdout, its peak RSS in MB)."""
    script = ("import resource, sys; from dvsa.cli import main; "
              "rc = main(['caption', '--checkpoint', sys.argv[1], sys.argv[2], '--boxes', sys.argv[3], "
              "'--out', sys.argv[4]]); "
              "print('PEAK_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", script, str(checkpoint), str(image), str(boxes), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, int(done.stdout.split("PEAK_MB")[1].split()[0])


def test_dvsa_caption_on_a_10000_px_jpeg_stays_in_modest_memory(big_jpeg, checkpoint, scene, tmp_path):
    """The whole command, on the 10000 px JPEG and on a 120 x 90 one: the big image costs its
    peak RSS less than one full decode (300 MB; with the picture drawn at full size it was
    8.4 GB), and the boxes stay in the file's pixels."""
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([[10, 10, 60, 50], [1000, 1000, 6000, 5000]]))
    printed, big_mb = _caption_in_a_child(checkpoint, big_jpeg, boxes, tmp_path / "out")
    assert f"{big_jpeg} (10000x10000):" in printed and "red circle   [1000, 1000, 6000, 5000]" in printed
    with Image.open(tmp_path / "out" / "big_captions.png") as im:
        assert im.size == (1200, 600)
    boxes.write_text(json.dumps([[10, 10, 60, 50], [100, 10, 120, 90]]))
    _, small_mb = _caption_in_a_child(checkpoint, scene, boxes, tmp_path / "out-small")
    assert big_mb - small_mb < 200, f"peak RSS {big_mb} MB for the 10000 px JPEG, {small_mb} MB for a small one"


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (8-bit RGB) and whose pixel data is a few bytes:
    what a decompression bomb looks like from outside."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture()
def no_decoding(monkeypatch):
    """Any pixel decode fails the test: the cap must refuse from the header alone."""
    from PIL import ImageFile

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("size, message", [
    ((10000, 10000), "a 10000x10000 PNG image is 100.0 megapixels (only JPEGs decode at reduced size), "
                     "over the cap of 50 megapixels (dvsa caption --max-megapixels)"),
    ((40000, 40000), "1600.0 megapixels, refused before decoding: over PIL's decompression-bomb limit of "
                     "179 megapixels (and the cap of 50, dvsa caption --max-megapixels)"),
])
def test_a_huge_png_header_is_refused_before_decoding(tmp_path, no_decoding, size, message):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header(*size))
    with pytest.raises(DataError) as e:
        open_image(str(p))
    assert str(e.value) == f"{p}: {message}"


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to say width x height."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_a_jpeg_over_the_cap_even_at_one_eighth_is_refused_from_its_header(tmp_path, no_decoding):
    p = tmp_path / "bomb.jpg"
    p.write_bytes(_jpeg_claiming(65535, 65535))
    with pytest.raises(DataError) as e:
        open_image(str(p))
    assert str(e.value) == (f"{p}: a 65535x65535 JPEG decodes to 67.1 megapixels even at 1/8 scale, "
                            f"over the cap of 50 megapixels (dvsa caption --max-megapixels)")


def test_the_cap_is_an_option(tmp_path, checkpoint, no_model, capsys):
    p = tmp_path / "wide.png"
    Image.new("RGB", (2000, 1000), (5, 5, 5)).save(p)
    assert open_image(str(p)).width == 2000 and MAX_MEGAPIXELS == 50
    assert main(["caption", "--checkpoint", str(checkpoint), str(p), "--max-megapixels", "1.5"]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"dvsa caption: error: {p}: a 2000x1000 PNG image is 2.0 megapixels (only JPEGs decode at reduced "
        f"size), over the cap of 1.5 megapixels (dvsa caption --max-megapixels)")


def test_a_huge_png_through_the_command_is_one_line_and_no_model(tmp_path, checkpoint, no_model, capsys):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header(10000, 10000))
    assert main(["caption", "--checkpoint", str(checkpoint), str(p)]) == 1
    assert "a 10000x10000 PNG image is 100.0 megapixels" in one_line(capsys.readouterr().err)


# =========================================================================== 2. boxes files


def _caption(checkpoint, image, boxes_content, tmp_path, *extra: str) -> int:
    boxes = tmp_path / "boxes.json"
    boxes.write_text(boxes_content if isinstance(boxes_content, str) else json.dumps(boxes_content))
    return main(["caption", "--checkpoint", str(checkpoint), str(image), "--boxes", str(boxes),
                 "--out", str(tmp_path / "o"), "--decode", "greedy", *extra])


def _printed_boxes(out: str) -> list[str]:
    return [line.split("[")[-1].rstrip("]") for line in out.splitlines() if "red circle" in line]


@pytest.mark.parametrize("content, extra, expected", [
    ([[10, 10, 50, 50]], (), ["10, 10, 50, 50"]),                                       # xyxy, the default
    ([[10, 10, 40, 40], [100, 50, 40, 40]], ("--box-format", "xywh"), ["10, 10, 50, 50", "100, 50, 120, 90"]),
    ({"scene.jpg": [[10, 10, 40, 40]]}, ("--box-format", "xywh"), ["10, 10, 50, 50"]),
    ([{"region_id": 1, "x": 10, "y": 10, "width": 40, "height": 40, "phrase": "a red circle"}], (),
     ["10, 10, 50, 50"]),                                                                 # VG region objects
    ({"scene.jpg": [{"x": 60, "y": 20, "width": 30, "height": 30}]}, (), ["60, 20, 90, 50"]),
    ({"results": [{"img_name": "scene.jpg", "boxes": [[10, 10, 40, 40], [60, 20, 30, 30]],
                   "captions": ["a red ball", "grey wall"], "scores": [5.1, 2.0]},
                  {"img_name": "elsewhere.jpg", "boxes": [[0, 0, 5, 5]], "captions": ["x"], "scores": [1.0]}],
      "opt": {"image_size": 720}}, (), ["10, 10, 50, 50", "60, 20, 90, 50"]),         # densecap results.json
])
def test_each_boxes_shape_is_read(checkpoint, scene, tmp_path, capsys, content, extra, expected):
    assert _caption(checkpoint, scene, content, tmp_path, *extra) == 0
    assert sorted(_printed_boxes(capsys.readouterr().out)) == sorted(expected)


def test_coco_detection_results_match_the_image_by_its_number(checkpoint, tmp_path, capsys):
    image = tmp_path / "COCO_val2014_000000000042.jpg"
    Image.new("RGB", (120, 90), (128, 128, 128)).save(image)
    detections = [{"image_id": 42, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
                  {"image_id": 7, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.8},
                  {"image_id": 42, "category_id": 2, "bbox": [60.5, 20, 100, 30], "score": 0.3}]
    assert _caption(checkpoint, image, detections, tmp_path) == 0
    assert sorted(_printed_boxes(capsys.readouterr().out)) == ["10, 10, 50, 50", "60, 20, 120, 50"]   # clipped


@pytest.mark.parametrize("content, extra, message", [
    ('[[1, 2, 3, 4]', (), "boxes.json: invalid JSON at line 1, column 14"),
    ([[1, 2, 3]], (), "boxes.json[0]: a box is four numbers [x1, y1, x2, y2], got [1, 2, 3]"),
    ([[0, 0, "5", 5]], (), "boxes.json[0]: a box is four numbers [x1, y1, x2, y2], got [0, 0, '5', 5]"),
    ("[[0, 0, 1e400, 5]]", (), "boxes.json[0]: a box is four numbers [x1, y1, x2, y2], got [0, 0, inf, 5]"),
    ("[[0, 0, NaN, 5]]", (), "boxes.json[0]: a box is four numbers [x1, y1, x2, y2], got [0, 0, nan, 5]"),
    ([[0, 0, 10 ** 400, 5]], (), "boxes.json[0]: a box is four numbers"),
    ([[10, 10, 5, 40]], (), "boxes.json[0]: [10, 10, 5, 40] is empty (need x2 > x1 and y2 > y1)"),
    ([[10, 10, 0, 5]], ("--box-format", "xywh"),
     "boxes.json[0]: [10, 10, 0, 5] is empty (need width > 0 and height > 0)"),
    ([[500, 500, 600, 600]], (), "boxes.json[0]: [500, 500, 600, 600] lies outside the 120x90 image"),
    ({"scene.jpg": [[0, 0, 5, 5]], "other.jpg": []}, (), "boxes.json: key 'other.jpg' names none of the images"),
    ({"scene.jpg": [{"x": 1, "y": 1, "width": 5}]}, (),
     "boxes.json: 'scene.jpg'[0]: a region object needs x, y, width, height; height missing in "),
    ([{"image_id": 1, "bbox": [0, 0, 5, 5]}, {"image_id": 1}], (),
     "boxes.json[1]: a COCO detection is {\"image_id\": ..., \"bbox\": [x, y, w, h], ...}, got {'image_id': 1}"),
    ([{"image_id": 1, "bbox": [0, 0, -5, 5]}], (),
     "boxes.json[0].bbox: [0, 0, -5, 5] is empty (need width > 0 and height > 0)"),
    ([{"image_id": 99, "bbox": [0, 0, 5, 5]}], (), "boxes.json: no image_id in it matches the images given"),
    ({"results": [{"img_name": "scene.jpg", "boxes": "10 10 40 40"}]}, (),
     "boxes.json: results[0].boxes: expected a list of [x, y, width, height] boxes, got str"),
    ({"results": [{"img_name": "nope.jpg", "boxes": []}]}, (), "boxes.json: no img_name in it matches"),
    ("3", (), "boxes.json: expected a list of boxes, an object keyed by image, COCO detection results or "
              "densecap's results.json, got int"),
    ([[0, 0, 5, 5]] * 3 + [list(range(10_000))], (), "boxes.json[3]: a box is four numbers [x1, y1, x2, y2], "
                                                      "got [0, 1, 2, 3, 4, 5, 6"),
])
def test_a_bad_boxes_file_is_one_line_and_the_model_is_never_built(checkpoint, scene, tmp_path, capsys, no_model,
                                                                   content, extra, message):
    assert _caption(checkpoint, scene, content, tmp_path, *extra) == 1
    line = one_line(capsys.readouterr().err)
    assert message in line and len(line) < 400, line


# =========================================================================== 3. model.weights


@pytest.fixture(scope="module")
def resnet18_state() -> dict:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


def _same_trunk(enc: ImageEncoder, state: dict) -> bool:
    ref = torchvision.models.resnet18(weights=None)
    ref.load_state_dict(state)
    return (torch.equal(enc.trunk[0].weight, ref.conv1.weight)
            and torch.equal(enc.trunk[7][1].bn2.running_var, ref.layer4[1].bn2.running_var))


@pytest.mark.parametrize("shape", ["bare", "ddp", "model", "state_dict", "ddp_in_state_dict"])
def test_resnet_weights_in_every_common_wrapping_load(tmp_path, resnet18_state, shape):
    ddp = {f"module.{k}": v for k, v in resnet18_state.items()}
    saved = {"bare": resnet18_state, "ddp": ddp,
             "model": {"model": resnet18_state, "epoch": 12, "args": {"lr": 0.1}},
             "state_dict": {"state_dict": resnet18_state, "optimizer": {"lr": torch.tensor(0.1)}},
             "ddp_in_state_dict": {"state_dict": ddp}}[shape]
    path = tmp_path / "w.pth"
    torch.save(saved, path)
    assert _same_trunk(ImageEncoder("resnet18", weights=str(path)), resnet18_state)


def test_a_trunk_saved_without_its_classifier_loads(tmp_path, resnet18_state):
    path = tmp_path / "trunk.pth"
    torch.save({k: v for k, v in resnet18_state.items() if not k.startswith("fc.")}, path)
    assert _same_trunk(ImageEncoder("resnet18", weights=str(path)), resnet18_state)


def test_tiny_weights_saved_from_ddp_load(tmp_path):
    src = ImageEncoder("tiny")
    path = tmp_path / "tiny.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.trunk.state_dict().items()}}, path)
    enc = ImageEncoder("tiny", weights=str(path))
    for k, v in src.trunk.state_dict().items():
        assert torch.equal(enc.trunk.state_dict()[k], v)


def _weights_error(tmp_path, obj, backbone="resnet18") -> str:
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    with pytest.raises(DvsaError) as e:
        ImageEncoder(backbone, weights=str(path))
    text = str(e.value)
    assert "\n" not in text and len(text) < 500, text
    return text


def test_missing_trunk_keys_are_refused_naming_the_first_few(tmp_path, resnet18_state):
    no_layer4 = {k: v for k, v in resnet18_state.items() if not k.startswith("layer4.")}
    missing = [k for k in resnet18_state if k.startswith("layer4.") and not k.endswith("num_batches_tracked")]
    text = _weights_error(tmp_path, no_layer4)
    assert text == (f"model.weights={tmp_path / 'w.pth'}: does not fit resnet18: {len(missing)} of its "
                    f"{len(resnet18_state)} keys are missing from the file ('layer4.0.conv1.weight', "
                    f"'layer4.0.bn1.weight', 'layer4.0.bn1.bias', 'layer4.0.bn1.running_mean', "
                    f"'layer4.0.bn1.running_var' and {len(missing) - 5} more)")


def test_foreign_keys_shapes_and_thousands_of_keys_stay_one_short_line(tmp_path, resnet18_state):
    assert "does not fit resnet18: the file has 1000 keys resnet18 does not ('extra.0', 'extra.1', 'extra.2', " \
           "'extra.3', 'extra.4' and 995 more)" in _weights_error(
               tmp_path, {**resnet18_state, **{f"extra.{i}": torch.zeros(1) for i in range(1000)}})
    assert "does not fit resnet18: 1 tensors differ in shape ('fc.weight'; fc.weight: (10, 512) in the file, " \
           "(1000, 512) in resnet18)" in _weights_error(tmp_path, {**resnet18_state, "fc.weight": torch.zeros(10, 512)})
    assert "does not fit tiny: 20 of its 24 keys are missing from the file ('features.0.weight', " in _weights_error(
        tmp_path, {f"junk.{i}": torch.zeros(1) for i in range(3000)}, "tiny")


def test_pickles_and_non_state_dicts_are_refused_in_one_line(tmp_path):
    assert _weights_error(tmp_path, {"conv.weight": torch.zeros(1), "when": datetime.date(2020, 1, 1)}).endswith(
        ": it holds a datetime.date object, which only pickle can load (weights are read with weights_only=True, "
        "never unpickled)")
    assert _weights_error(tmp_path, {"conv.weight": torch.zeros(1), "epoch": 3, "note": "x"}).endswith(
        " is not a state dict: 2 entries are not tensors ('epoch', 'note')")
    assert _weights_error(tmp_path, [torch.zeros(1)]).endswith(" holds a list, not a state dict")
    truncated = tmp_path / "cut.pth"
    torch.save({"a": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(DvsaError, match=r"cannot read .*cut.pth: RuntimeError: PytorchStreamReader failed reading "
                                        r"zip archive: failed finding central directory$"):
        ImageEncoder("tiny", weights=str(truncated))


def test_a_cached_torchvision_file_is_checked_against_the_hash_in_its_name(tmp_path, monkeypatch, resnet18_state):
    from types import SimpleNamespace

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(resnet18_state, cache / "resnet18-f37072fd.pth")    # torchvision's name, other bytes
    with pytest.raises(DvsaError) as e:
        ImageEncoder("resnet18", weights="ResNet18_Weights.IMAGENET1K_V1")
    digest = hashlib.sha256((cache / "resnet18-f37072fd.pth").read_bytes()).hexdigest()
    assert str(e.value) == (
        f"model.weights=ResNet18_Weights.IMAGENET1K_V1: {cache / 'resnet18-f37072fd.pth'} is damaged or not the "
        f"published file (its sha256 starts {digest[:8]}, its name says f37072fd); delete it and download "
        f"https://download.pytorch.org/models/resnet18-f37072fd.pth again")
    good = cache / f"resnet18-{digest[:10]}.pth"                       # a longer prefix is checked whole
    shutil.copy(cache / "resnet18-f37072fd.pth", good)
    monkeypatch.setattr(torchvision.models, "get_weight", lambda name: SimpleNamespace(url=f"https://x/{good.name}"))
    assert _same_trunk(ImageEncoder("resnet18", weights="ResNet18_Weights.IMAGENET1K_V1"), resnet18_state)


# =========================================================================== 4. bad checkpoints


@pytest.fixture()
def no_ray(monkeypatch):
    """`dvsa evaluate` must refuse before it starts Ray: runtime.ray_session fails the test."""
    import ray

    from dvsa import runtime

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a bad checkpoint")

    monkeypatch.setattr(runtime, "ray_session", refuse)
    yield
    assert not ray.is_initialized()


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


def _corrupt(kind: str, ckpt: Path) -> tuple[Path, str]:
    """(the path to give --checkpoint, the expected message) for one kind of bad checkpoint."""
    state = ckpt / "state.pt"
    if kind == "empty dir":
        for f in ckpt.iterdir():
            f.unlink()
        return ckpt, f"{ckpt}: not a checkpoint: no state.pt in it, and no checkpoint_*/state.pt (a Ray Train " \
                     f"run dir) either"
    if kind == "no state.pt":
        state.unlink()
        return ckpt, f"{ckpt}: incomplete checkpoint: no state.pt beside its config.yaml, checkpoint.json"
    if kind == "truncated state.pt":
        state.write_bytes(state.read_bytes()[:1000])
        return ckpt, f"{state}: cannot load checkpoint: RuntimeError: PytorchStreamReader failed reading zip " \
                     f"archive: failed finding central directory"
    if kind == "pickled state.pt":
        torch.save({"model": {}, "saved": datetime.datetime(2020, 1, 1)}, state)
        return ckpt, f"{state}: cannot load checkpoint: it holds a datetime.datetime object, which only pickle " \
                     f"can load (weights are read with weights_only=True, never unpickled)"
    if kind == "tensor state.pt":
        torch.save(torch.zeros(3), state)
        return ckpt, f"{state}: not a dvsa checkpoint (no model state dict in it)"
    if kind == "no vocab":
        (ckpt / "vocab.json").unlink()
        return ckpt, f"{ckpt / 'vocab.json'}: no such vocabulary file"
    if kind == "bad config.yaml":
        (ckpt / "config.yaml").write_text("task: caption\nmodel:\n  backbone: [tiny\n")
        return ckpt, f"{ckpt / 'config.yaml'}: invalid YAML at line 4, column 1: expected ',' or ']', " \
                     f"but got '<stream end>'"
    if kind == "config.yaml a list":
        (ckpt / "config.yaml").write_text("- task\n- caption\n")
        return ckpt, f"{ckpt / 'config.yaml'}: not a dvsa config (top level is a list, not a mapping)"
    if kind == "run dir, bad checkpoint.json":
        run = ckpt.parent / "run"
        run.mkdir()
        ckpt.rename(run / "checkpoint_000001")
        (run / "checkpoint_000001" / "checkpoint.json").write_text('{"step": 3,')
        return run, f"{run / 'checkpoint_000001' / 'checkpoint.json'}: cannot read (JSONDecodeError: Expecting " \
                    f"property name enclosed in double quotes: line 1 column 12 (char 11))"
    raise ValueError(kind)


KINDS = ["empty dir", "no state.pt", "truncated state.pt", "pickled state.pt", "tensor state.pt", "no vocab",
         "bad config.yaml", "config.yaml a list", "run dir, bad checkpoint.json"]


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_refuses_a_bad_checkpoint_before_ray_in_one_line(checkpoint, tmp_path, monkeypatch, capsys,
                                                                  no_ray, kind):
    monkeypatch.chdir(tmp_path)
    given, message = _corrupt(kind, _copy(checkpoint, tmp_path))
    assert main(["evaluate", "--checkpoint", str(given), f"out={tmp_path / 'eval-out'}"]) == 1
    assert one_line(capsys.readouterr().err) == f"dvsa evaluate: error: {message}"
    assert not (tmp_path / "eval-out").exists() and not (tmp_path / "runs").exists()   # no MLflow store either


@pytest.mark.parametrize("kind", ["bad config.yaml", "truncated state.pt", "no state.pt"])
def test_caption_and_search_name_a_bad_checkpoint_in_one_line(checkpoint, scene, tmp_path, capsys, kind):
    given, message = _corrupt(kind, _copy(checkpoint, tmp_path))
    assert main(["caption", "--checkpoint", str(given), str(scene), "--out", str(tmp_path / "o")]) == 1
    assert one_line(capsys.readouterr().err) == f"dvsa caption: error: {message}"
    assert main(["search", "red", "--checkpoint", str(given), "--shards", str(tmp_path)]) == 1
    assert one_line(capsys.readouterr().err) == f"dvsa search: error: {message}"


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_one_line(checkpoint, scene, tmp_path, capsys):
    ckpt = _copy(checkpoint, tmp_path)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["model"]["captioner.W_oh.weight"]
    state["model"]["captioner.extra"] = torch.zeros(2)
    torch.save(state, ckpt / "state.pt")
    assert main(["caption", "--checkpoint", str(ckpt), str(scene), "--out", str(tmp_path / "o")]) == 1
    assert one_line(capsys.readouterr().err).startswith(
        f"dvsa caption: error: {ckpt / 'state.pt'}: does not fit the caption model its config.yaml describes: 1 of "
        f"its ")

