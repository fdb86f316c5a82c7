"""`dvsa prepare` on hostile and real-world inputs (issue 11): paths that would leave the images
root, files that are not regular or too large, damaged shard sets, inputs that write nothing,
the real variants of VG / COCO / Flickr files, and manifests that cannot be trained on. Each
case feeds the exact input and checks the outcome: the one-line error (and exit code), or the
counters in the manifest; in-process (no Ray)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

from dvsa.data.image_files import Refused, is_safe_relpath, read_image
from dvsa.data.manifest import MANIFEST, Manifest
from dvsa.data.prepare import KarpathySource, PrepareOptions, VGSource, prepare_karpathy, prepare_vg, summary
from dvsa.data.shards import iter_samples
from dvsa.errors import DataError

LOCAL = PrepareOptions(use_ray=False, progress=False)


def jpeg(w=32, h=24, colour=(200, 30, 30), noise=False) -> bytes:
    im = Image.effect_noise((w, h), 80).convert("RGB") if noise else Image.new("RGB", (w, h), colour)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_json(path: Path, obj) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def kp_image(filename, imgid, split="train", filepath=None, cocoid=None, sentences=("a red box",)):
    e = {"filename": filename, "imgid": imgid, "split": split, "sentences": [{"raw": s} for s in sentences]}
    if filepath is not None:
        e["filepath"] = filepath
    if cocoid is not None:
        e["cocoid"] = cocoid
    return e


def kp_json(tmp_path: Path, images: list[dict], name="dataset_x.json") -> str:
    return write_json(tmp_path / name, {"dataset": "x", "images": images})


def samples(out) -> dict:
    return {k: (jpg, meta) for k, jpg, meta in iter_samples(str(out))}


def region(rid, iid, phrase="a red box", x=2, y=2, w=10, h=10):
    return {"region_id": rid, "image_id": iid, "phrase": phrase, "x": x, "y": y, "width": w, "height": h}


def vg_root(tmp_path: Path, image_data: list[dict], regions: list[dict], files: dict[str, bytes]) -> Path:
    root = tmp_path / "vg"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    write_json(root / "image_data.json", image_data)
    write_json(root / "region_descriptions.json", regions)
    return root


def image_entry(iid, folder="VG_100K", name=None, w=32, h=24, **extra):
    return {"image_id": iid, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{name or f'{iid}.jpg'}",
            "width": w, "height": h, "coco_id": None, "flickr_id": None, **extra}


@pytest.fixture
def opened(monkeypatch):
    """Every path this process os.open()s or os.stat()s while the test runs (image files are
    read through os.open; the chunk fingerprint stats them)."""
    seen: list[str] = []
    real_open, real_stat = os.open, os.stat

    def spy_open(path, *a, **kw):
        seen.append(os.fspath(path))
        return real_open(path, *a, **kw)

    def spy_stat(path, *a, **kw):
        if isinstance(path, (str, bytes, os.PathLike)):
            seen.append(os.fsdecode(path))
        return real_stat(path, *a, **kw)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "stat", spy_stat)
    return seen


# --------------------------------------------------------------------------- 1. paths and limits


def test_karpathy_file_names_that_leave_the_root_are_never_read(tmp_path, opened):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = jpeg(colour=(0, 255, 0))
    (outside / "secret.jpg").write_bytes(secret)
    root = tmp_path / "data" / "imgs"
    root.mkdir(parents=True)
    good = jpeg()
    (root / "a.jpg").write_bytes(good)
    js = kp_json(tmp_path, [
        kp_image("a.jpg", 0),
        kp_image("../../outside/secret.jpg", 1),                             # relative, climbs out
        kp_image(str(outside / "secret.jpg"), 2, split="val"),               # absolute
        kp_image("secret.jpg", 3, filepath="../../outside", split="test"),  # the folder climbs out
        kp_image("sub/../../../outside/secret.jpg", 4),                       # .. in the middle
    ])
    m = prepare_karpathy(KarpathySource(js, str(root), min_count=1), str(tmp_path / "out"), LOCAL)
    m.check_balance()
    assert m.dropped("images") == {"unsafe_path": 4}
    assert m.dropped("sentences") == {"unsafe_path": 4}
    assert m.sections["drop_details"]["examples"]["train"]["unsafe_path"] == "../../outside/secret.jpg"
    assert m.input_details["image_bytes_read"] == len(good)
    got = samples(tmp_path / "out")
    assert set(got) == {"0"} and all(jpg != secret for jpg, _ in got.values())
    assert str(root / "a.jpg") in opened       # the spy sees what is read
    assert not [p for p in opened if str(outside) in os.path.abspath(p)]


def test_vg_url_that_leaves_its_folder_is_refused(tmp_path, opened):
    root = vg_root(tmp_path, [image_entry(1), image_entry(2, name="..")],
                   [{"id": 1, "regions": [region(10, 1)]}, {"id": 2, "regions": [region(20, 2)]}],
                   {"VG_100K/1.jpg": jpeg(), "VG_100K/2.jpg": jpeg()})
    m = prepare_vg(VGSource(str(root), val_images=0, test_images=0, min_count=1), str(tmp_path / "out"), LOCAL)
    assert m.dropped("images") == {"unsafe_path": 1} and m.dropped("regions") == {"unsafe_path": 1}
    assert m.sections["drop_details"]["examples"]["train"]["unsafe_path"] == "VG_100K/.."
    assert not [p for p in opened if p.endswith("/2.jpg")]


@pytest.mark.parametrize("rel, safe", [
    ("a.jpg", True), ("val2014/a.jpg", True), ("a..b.jpg", True), ("./a.jpg", True),
    ("../a.jpg", False), ("/etc/passwd", False), ("a/../../b", False), ("..\\..\\b.jpg", False),
    ("s3://bucket/a.jpg", False), ("", False), ("a\x00.jpg", False), ("a/..", False),
])
def test_which_relative_paths_are_safe(rel, safe):
    assert is_safe_relpath(rel) is safe


def test_fifo_device_and_directory_are_refused_without_hanging(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg())
    os.mkfifo(root / "fifo.jpg")                    # opening it for reading would wait for a writer
    os.symlink("/dev/zero", root / "zero.jpg")      # endless bytes
    (root / "dir.jpg").mkdir()
    js = kp_json(tmp_path, [kp_image("a.jpg", 0), kp_image("fifo.jpg", 1), kp_image("zero.jpg", 2),
                            kp_image("dir.jpg", 3)])
    result: dict = {}

    def run():
        result["m"] = prepare_karpathy(KarpathySource(js, str(root), min_count=1), str(tmp_path / "out"), LOCAL)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "prepare hung on a FIFO or a device"
    m = result["m"]
    assert m.dropped("images") == {"not_a_file": 3}
    assert m.written["images"] == 1
    assert m.sections["drop_details"]["examples"]["train"]["not_a_file"] == str(root / "fifo.jpg")


def test_oversized_files_are_dropped_unread(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    small, big = jpeg(16, 16), jpeg(200, 200, noise=True)
    assert len(small) < 2000 < len(big)
    (root / "small.jpg").write_bytes(small)
    (root / "big.jpg").write_bytes(big)
    js = kp_json(tmp_path, [kp_image("small.jpg", 0), kp_image("big.jpg", 1)])
    m = prepare_karpathy(KarpathySource(js, str(root), min_count=1), str(tmp_path / "out"),
                         dataclasses.replace(LOCAL, max_image_bytes=2000))
    assert m.dropped("images") == {"too_large": 1}
    assert m.input_details["image_bytes_read"] == len(small)
    assert m.params["max_image_bytes"] == 2000
    with pytest.raises(Refused) as e:
        read_image([str(root / "big.jpg")], 2000)
    assert e.value.reason == "too_large"
    assert read_image([str(root / "none.jpg"), str(root / "small.jpg")], 2000) == (1, small)
    with pytest.raises(DataError, match="--max-image-bytes must be > 0, got 0"):
        PrepareOptions(max_image_bytes=0)


def test_remote_files_keep_the_limits():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/dvsa-hostile/big.jpg", b"x" * 5000)
    fs.makedirs("/dvsa-hostile/dir.jpg", exist_ok=True)
    fs.pipe("/dvsa-hostile/dir.jpg/inner", b"x")
    with pytest.raises(Refused, match="too_large"):
        read_image(["memory://dvsa-hostile/big.jpg"], 1000)
    with pytest.raises(Refused, match="not_a_file"):
        read_image(["memory://dvsa-hostile/dir.jpg"], 1000)
    assert read_image(["memory://dvsa-hostile/none.jpg", "memory://dvsa-hostile/big.jpg"], 5000) == (1, b"x" * 5000)


# --------------------------------------------------------------------------- 2. repairable


def test_rerun_redoes_chunks_whose_shards_were_truncated_or_deleted(synth_world, tmp_path):
    source = VGSource(str(synth_world / "vg"), split_file=str(synth_world / "vg" / "densecap_splits.json"),
                      min_count=1)
    options = dataclasses.replace(LOCAL, chunk_images=16, shard_bytes=40_000)
    out = tmp_path / "out"
    first = prepare_vg(source, str(out), options)
    n_chunks = first.sections["run"]["chunks"]
    before = samples(out)
    by_chunk: dict[int, list[str]] = {}
    for s in first.shards:
        by_chunk.setdefault(int(s.name[-10:-4]) // 1000, []).append(s.name)
    (a, *_), (b, *_) = list(by_chunk.values())[:2]
    with open(out / a, "r+b") as f:
        f.truncate(1000)
    (out / b).unlink()

    second = prepare_vg(source, str(out), options)
    assert second.sections["run"]["chunks_skipped"] == n_chunks - 2
    assert second.sections["run"]["chunks_repaired"] == 2
    assert "2 redone: their shards were missing or changed" in summary(second)
    assert second.shards == first.shards and second.splits == first.splits
    assert Manifest.read(str(out)) == second
    for s in second.shards:
        data = (out / s.name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (s.size, s.sha256)
    assert samples(out) == before

    # same size, other bytes: only the sha256 recheck (the default) sees it
    original = (out / a).read_bytes()
    data = bytearray(original)
    data[700] ^= 0xFF
    (out / a).write_bytes(bytes(data))
    by_size = prepare_vg(source, str(out), dataclasses.replace(options, recheck="size"))
    assert by_size.sections["run"]["chunks_skipped"] == n_chunks
    by_hash = prepare_vg(source, str(out), options)
    assert by_hash.sections["run"]["chunks_repaired"] == 1
    assert (out / a).read_bytes() == original


# --------------------------------------------------------------------------- 3. nothing written


@pytest.mark.parametrize("regions, error", [
    ([], "no samples written: 2 of 2 images dropped, most as no_region_entry (2); no image file was read for "
         "them; region_descriptions.json has no entry for these images of image_data.json: are both files of "
         "one VG release?"),
    ({}, "region_descriptions.json: the top level is an object, not a list of {\"id\", \"regions\"} "
         "(VG's region_descriptions.json)"),
])
def test_empty_region_descriptions_is_an_error(tmp_path, capsys, regions, error):
    from dvsa.cli import main

    root = vg_root(tmp_path, [image_entry(1), image_entry(2)], [], {"VG_100K/1.jpg": jpeg(), "VG_100K/2.jpg": jpeg()})
    write_json(root / "region_descriptions.json", regions)
    rc = main(["prepare", "vg", "--root", str(root), "--val-images", "0", "--test-images", "0",
               "--out", str(tmp_path / "out"), "--no-ray", "--quiet"])
    assert rc == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("dvsa prepare: error: ") and line.endswith(error)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_wrong_images_root_is_one_line_and_exit_code_1(tmp_path, capsys):
    from dvsa.cli import main

    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg())
    js = kp_json(tmp_path, [kp_image("a.jpg", 0), kp_image("b.jpg", 1, split="val")])
    wrong = tmp_path / "elsewhere"
    rc = main(["prepare", "karpathy", "--json", js, "--images-root", str(wrong), "--out", str(tmp_path / "out"),
               "--no-ray", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"dvsa prepare: error: no samples written: 2 of 2 images dropped, most as missing_file (2); first path "
        f"tried: {wrong}/a.jpg; --images-root must be the directory the split file's filepath/filename are "
        f"relative to (COCO: the folder holding val2014/ and train2014/, or train2017/ and val2017/)")


def test_a_split_that_loses_most_images_is_a_warning(tmp_path, caplog):
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("a.jpg", "b.jpg", "v1.jpg"):
        (root / name).write_bytes(jpeg())
    js = kp_json(tmp_path, [kp_image("a.jpg", 0), kp_image("b.jpg", 1), kp_image("v1.jpg", 2, split="val"),
                            kp_image("v2.jpg", 3, split="val"), kp_image("v3.jpg", 4, split="val")])
    with caplog.at_level(logging.WARNING, logger="dvsa.data.prepare"):
        m = prepare_karpathy(KarpathySource(js, str(root), min_count=1), str(tmp_path / "out"), LOCAL)
    val = (f"split val: 2 of 3 images dropped, most as missing_file (2); first path tried: {root}/v2.jpg; "
           "--images-root must be the directory the split file's filepath/filename are relative to (COCO: the "
           "folder holding val2014/ and train2014/, or train2017/ and val2017/)")
    assert m.sections["warnings"] == [val, "split test: no images (none of the input's images is in it)"]
    assert m.sections["drop_details"] == {"by_split": {"val": {"missing_file": 2}},
                                          "examples": {"val": {"missing_file": f"{root}/v2.jpg"}}}
    assert val in [r.getMessage() for r in caplog.records]
    assert f"warning: {val}" in summary(m)
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["warnings"] == m.sections["warnings"]


def test_densecap_single_images_folder_is_accepted(tmp_path):
    root = vg_root(tmp_path, [image_entry(1), image_entry(2, folder="VG_100K_2")],
                   [{"id": 1, "regions": [region(10, 1)]}, {"id": 2, "regions": [region(20, 2)]}],
                   {"images/1.jpg": jpeg(), "images/2.jpg": jpeg()})
    m = prepare_vg(VGSource(str(root), val_images=0, test_images=0, min_count=1), str(tmp_path / "out"), LOCAL)
    assert m.written["images"] == 2 and not m.dropped("images")
    assert m.info["found_by_image_id"] == 2


def test_coco_2017_file_names_are_found_from_the_2014_names(tmp_path):
    root = tmp_path / "coco"
    files = {"val2017/000000000042.jpg": jpeg(colour=(1, 2, 3)), "train2017/000000000043.jpg": jpeg(colour=(4, 5, 6)),
             "val2014/COCO_val2014_000000000044.jpg": jpeg(colour=(7, 8, 9))}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    js = kp_json(tmp_path, [kp_image(f"COCO_val2014_0000000000{i}.jpg", i, filepath="val2014", cocoid=i)
                            for i in (42, 43, 44)])
    m = prepare_karpathy(KarpathySource(js, str(root), min_count=1), str(tmp_path / "out"), LOCAL)
    assert m.written["images"] == 3
    assert m.info["found_by_coco2017_name"] == 2 and m.info["found_by_filename"] == 1
    got = samples(tmp_path / "out")
    assert got["42"][0] == files["val2017/000000000042.jpg"]
    assert got["42"][1]["file_name"] == "COCO_val2014_000000000042.jpg"


@pytest.mark.parametrize("doc, error", [
    ([{"file_path": "val2014/COCO_val2014_000000391895.jpg", "captions": ["a man"], "id": 391895}],
     "a list of {file_path, captions, id} (neuraltalk2's coco_raw.json), not a Karpathy split file; expected a "
     "Karpathy split file (dataset_coco.json, dataset_flickr30k.json): {\"images\": [{\"filename\", "
     "\"sentences\": [{\"raw\"}], \"split\", \"cocoid\" or \"imgid\"}]}"),
    ({"info": {}, "images": [{"file_name": "COCO_train2014_000000057870.jpg", "id": 57870, "height": 480}],
      "annotations": [{"image_id": 57870, "id": 1, "caption": "A restaurant."}]},
     "COCO's captions_*.json layout (images[].file_name, captions in 'annotations', no splits), not a Karpathy "
     "split file; expected a Karpathy split file"),
    ({"dataset": "coco", "images": []}, "no 'images' list, or it is empty; expected a Karpathy split file"),
])
def test_files_mistaken_for_a_karpathy_split_file(tmp_path, capsys, doc, error):
    from dvsa.cli import main

    js = write_json(tmp_path / "given.json", doc)
    rc = main(["prepare", "karpathy", "--json", js, "--images-root", str(tmp_path), "--out", str(tmp_path / "out"),
               "--no-ray", "--quiet"])
    assert rc == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"dvsa prepare: error: {js}: {error}")


# --------------------------------------------------------------------------- 4. real variants


def test_vg_v1_0_spellings_and_url_names(tmp_path):
    """v1.0: image_data ``id``, regions ``id`` + ``image``; a url whose file name is not the id
    (found by the url's name when no ``<id>.jpg`` exists; ``<id>.jpg`` wins when both do)."""
    first, second, decoy = jpeg(colour=(10, 10, 10)), jpeg(colour=(20, 20, 20)), jpeg(colour=(30, 30, 30))
    image_data = [{"id": 1, "url": "https://x/VG_100K/photo_one.jpg", "width": 32, "height": 24,
                   "coco_id": None, "flickr_id": 777},
                  {"id": 2, "url": "https://x/VG_100K_2/decoy.jpg", "width": 32, "height": 24,
                   "coco_id": None, "flickr_id": None}]
    regions = [{"id": 1, "regions": [{"id": 10, "image": 1, "phrase": "a cat", "x": 1, "y": 1, "width": 5,
                                      "height": 5}]},
               {"id": 2, "regions": [{"id": 20, "image": 2, "phrase": "a dog", "x": 1, "y": 1, "width": 5,
                                      "height": 5}]}]
    root = vg_root(tmp_path, image_data, regions,
                   {"VG_100K/photo_one.jpg": first, "VG_100K_2/2.jpg": second, "VG_100K_2/decoy.jpg": decoy})
    m = prepare_vg(VGSource(str(root), val_images=0, test_images=0, min_count=1), str(tmp_path / "out"), LOCAL)
    assert not m.dropped("images") and not m.dropped("regions")
    assert m.info["found_by_url_name"] == 1 and m.info["found_by_image_id"] == 1
    got = samples(tmp_path / "out")
    assert got["1"][0] == first and got["2"][0] == second
    assert [r["id"] for r in got["1"][1]["regions"]] == [10]
    assert got["1"][1]["flickr_id"] == 777 and got["2"][1]["flickr_id"] is None


def test_pre_resized_mirror_boxes_are_rescaled_to_the_file(tmp_path):
    """image_data.json says 64x48, the mirror's file is 32x24: boxes are halved, not clipped.
    A file of another aspect ratio (999x24 said, 32x24 found) keeps its boxes, clipped."""
    root = vg_root(tmp_path, [image_entry(1, w=64, h=48), image_entry(2, w=999, h=24)],
                   [{"id": 1, "regions": [region(10, 1, x=10, y=10, w=40, h=20)]},
                    {"id": 2, "regions": [region(20, 2, x=10, y=10, w=40, h=5)]}],
                   {"VG_100K/1.jpg": jpeg(32, 24), "VG_100K/2.jpg": jpeg(32, 24)})
    m = prepare_vg(VGSource(str(root), val_images=0, test_images=0, min_count=1), str(tmp_path / "out"), LOCAL)
    assert m.info["boxes_rescaled_to_file"] == 1 and m.info["size_differs_from_metadata"] == 2
    assert m.info["boxes_clipped"] == 1
    got = samples(tmp_path / "out")
    assert got["1"][1]["regions"][0]["box"] == [5.0, 5.0, 25.0, 15.0]
    assert got["2"][1]["regions"][0]["box"] == [10, 10, 32, 15]


def test_proposals_keyed_by_file_names_and_unmatched_keys(tmp_path):
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    for i in (1, 2, 3):
        (root / "val2014" / f"COCO_val2014_00000000000{i}.jpg").write_bytes(jpeg())
    js = kp_json(tmp_path, [kp_image(f"COCO_val2014_00000000000{i}.jpg", 10 + i, filepath="val2014", cocoid=i)
                            for i in (1, 2, 3)])
    props = write_json(tmp_path / "proposals.json", {"COCO_val2014_000000000001.jpg": [[0, 0, 10, 10]],
                                                     "000000000002.jpg": [[1, 1, 5, 5]], "999999": [[0, 0, 3, 3]]})
    m = prepare_karpathy(KarpathySource(js, str(root), proposals=props, min_count=1), str(tmp_path / "out"), LOCAL)
    assert m.info["proposals_unmatched_keys"] == 1 and m.info["images_without_proposals"] == 1
    got = samples(tmp_path / "out")
    assert got["1"][1]["proposals"] == [[0, 0, 10, 10]] and got["2"][1]["proposals"] == [[1, 1, 5, 5]]
    assert got["3"][1]["proposals"] == []

    vg_ids = write_json(tmp_path / "vg_ids.json", {"2417890": [[0, 0, 1, 1]], "2417891": [[0, 0, 1, 1]]})
    with pytest.raises(DataError, match=r"vg_ids.json: none of its 2 keys \(e.g. '2417890', '2417891'\) matches an "
                                        r"image of .*dataset_x.json; keys must be the images' cocoid \(else imgid\) "
                                        r"or file names$"):
        prepare_karpathy(KarpathySource(js, str(root), proposals=vg_ids), str(tmp_path / "out2"), LOCAL)
    assert not (tmp_path / "out2").exists()


# --------------------------------------------------------------------------- 5. splits, info, names


def test_info_counts_written_images_only_and_flickr_names_are_kept(tmp_path):
    root = tmp_path / "flickr"
    root.mkdir()
    for name in ("1000092795.jpg", "10002456.jpg"):
        (root / name).write_bytes(jpeg(64, 48))
    js = kp_json(tmp_path, [kp_image("1000092795.jpg", 0), kp_image("10002456.jpg", 1, sentences=("?!",))],
                 name="dataset_flickr8k.json")
    m = prepare_karpathy(KarpathySource(js, str(root), min_count=1), str(tmp_path / "out"),
                         dataclasses.replace(LOCAL, max_side=32))
    assert m.dropped("images") == {"no_valid_captions": 1}
    assert m.info["images_downscaled"] == 1 and m.info["found_by_filename"] == 1
    [(key, (_, meta))] = samples(tmp_path / "out").items()
    assert key == "0" and meta["file_name"] == "1000092795.jpg"


def test_a_small_default_split_warns_about_its_empty_splits(tmp_path):
    """Two images: the default split gives val and test none; prepare says so."""
    root = vg_root(tmp_path, [image_entry(1), image_entry(2)],
                   [{"id": 1, "regions": [region(10, 1)]}, {"id": 2, "regions": [region(20, 2)]}],
                   {"VG_100K/1.jpg": jpeg(), "VG_100K/2.jpg": jpeg()})
    m = prepare_vg(VGSource(str(root), min_count=1), str(tmp_path / "out"), LOCAL)
    assert m.sections["warnings"] == ["split val: no images (none of the input's images is in it)",
                                      "split test: no images (none of the input's images is in it)"]


# --------------------------------------------------------------------------- 6. manifests before Ray


def test_manifest_problems_are_one_line_each(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg())
    (root / "b.jpg").write_bytes(jpeg())
    js = kp_json(tmp_path, [kp_image("a.jpg", 0), kp_image("b.jpg", 1, split="val")])
    out = tmp_path / "out"
    m = prepare_karpathy(KarpathySource(js, str(root), min_count=1), str(out), LOCAL)
    m.check_shards(str(out))
    good = json.loads((out / MANIFEST).read_text())
    where = str(out / MANIFEST)

    def error_of(doc) -> str:
        (out / MANIFEST).write_text(json.dumps(doc))
        with pytest.raises(DataError) as e:
            Manifest.read(str(out)).check_shards(str(out))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert error_of([good]) == f"{where}: the top level is a list, not an object"
    assert error_of({**good, "written": good["written"], "splits": {**good["splits"], "val": {
        **good["splits"]["val"], "images": "1"}}}) == f"{where}: splits.val.images is '1', not a number"
    (out / MANIFEST).write_text(json.dumps(good))
    val_shard = next(s.name for s in m.shards if s.split == "val")
    (out / val_shard).unlink()
    assert error_of(good) == (f"{where}: lists 1 shard(s) not in {out} (first: {val_shard}); re-run the "
                              "`dvsa prepare` command that wrote it")
    train_shard = next(s.name for s in m.shards if s.split == "train")
    (out / val_shard).write_bytes(b"")
    with open(out / train_shard, "ab") as f:
        f.write(b"\0" * 512)
    msg = error_of(good)
    assert msg.startswith(f"{where}: ") and "the manifest says" in msg and "re-run the `dvsa prepare`" in msg


def test_training_checks_the_shards_before_ray(shards, tmp_path):
    from eval_fixtures import tiny_cfg

    from dvsa.train.launch import check_inputs

    copy = tmp_path / "shards"
    shutil.copytree(shards / "vg", copy / "vg")
    shutil.copytree(shards / "kp", copy / "kp")
    m = Manifest.read(str(copy / "vg"))
    (copy / "vg" / m.shards_of("train")[0].name).unlink()
    cfg = tiny_cfg(copy, tmp_path)
    with pytest.raises(DataError, match=r"manifest.json: lists 1 shard\(s\) not in .*/vg \(first: train-"):
        check_inputs(cfg, cfg.task)
