"""`dvsa caption`: a synthetic image + boxes file -> printed captions and a PNG; clear errors."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import ROOT, chain_captioner, save
from PIL import Image, ImageDraw

from dvsa.cli import main
from dvsa.text import Vocab

WORDS = ["a", "red", "circle", "blue", "square", "on", "the", "left"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A captioner that says "red circle" for every box (its decode is fixed by hand)."""
    from dvsa.config import load_config

    d = tmp_path_factory.mktemp("caption_ckpt")
    vocab = Vocab.build({w: 10 - i for i, w in enumerate(WORDS)}, 1, 20)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["task=caption", "caption.cell=rnn", "model.word_dim=16",
                                                       "model.hidden_dim=16", f"out={d}"])
    return save(chain_captioner(cfg, vocab, ["red", "circle"]), vocab, cfg, d / "ckpt")


@pytest.fixture()
def image(tmp_path):
    im = Image.new("RGB", (120, 90), (128, 128, 128))
    ImageDraw.Draw(im).ellipse([10, 10, 50, 50], fill=(220, 30, 30))
    p = tmp_path / "scene.jpg"
    im.save(p, quality=90)
    return p


def test_caption_boxes_prints_captions_and_writes_the_picture(checkpoint, image, tmp_path, capsys):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"scene.jpg": [[10, 10, 50, 50], [60, 20, 200, 80]]}))
    out = tmp_path / "out"
    assert main(["caption", "--checkpoint", str(checkpoint), str(image), "--boxes", str(boxes),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("red circle") == 2
    assert "[10, 10, 50, 50]" in printed and "[60, 20, 120, 80]" in printed   # clipped to the image
    png = out / "scene_captions.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1200, 600)
    res = json.loads((out / "captions.json").read_text())
    assert [r["caption"] for r in res[0]["regions"]] == ["red circle", "red circle"]
    assert all(r["logprob"] < 0 for r in res[0]["regions"])


def test_caption_whole_image_without_boxes(checkpoint, image, tmp_path, capsys):
    assert main(["caption", "--checkpoint", str(checkpoint), str(image), "--out", str(tmp_path / "o"),
                 "--decode", "greedy"]) == 0
    printed = capsys.readouterr().out
    assert "red circle   [0, 0, 120, 90]" in printed


@pytest.mark.parametrize("content, message", [
    ("[[1, 2, 3]]", "boxes.json[0]: a box is four numbers"),
    ("[[10, 10, 5, 40]]", "boxes.json[0]: [10, 10, 5, 40] is empty"),
    ("[[500, 500, 600, 600]]", "lies outside the 120x90 image"),
    ('{"other.jpg": [[0, 0, 5, 5]]}', "key 'other.jpg' names none of the images"),
    ('{"scene.jpg": [[0, 0, 5, 5]],\n "x": ', "invalid JSON at line 2"),
])
def test_bad_boxes_file_is_one_clear_line(checkpoint, image, tmp_path, capsys, content, message):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(content)
    assert main(["caption", "--checkpoint", str(checkpoint), str(image), "--boxes", str(boxes),
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_and_corrupt_images_are_named(checkpoint, image, tmp_path, capsys):
    assert main(["caption", "--checkpoint", str(checkpoint), str(tmp_path / "gone.jpg")]) == 1
    assert "gone.jpg: no such image file" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(image.read_bytes()[:300])     # a truncated JPEG opens, then fails to decode
    assert main(["caption", "--checkpoint", str(checkpoint), str(broken)]) == 1
    assert "broken.jpg: cannot decode image" in capsys.readouterr().err
