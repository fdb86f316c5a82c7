"""One prepare chunk (dvsa.data.chunks), in-process: what each raw item becomes, and the
completion record's balance (inputs = written + dropped), with known answers."""

from __future__ import annotations

import io
import json

from PIL import Image

from dvsa.data.chunks import ChunkCounts, build_sample, fingerprint, process_chunk, read_record
from dvsa.data.manifest import Tally
from dvsa.data.shards import iter_samples

PARAMS = {"shard_bytes": 1 << 20, "iou_threshold": 0.7, "max_side": None, "verify": "decode"}


def _jpeg(path, w=100, h=80):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue())
    return str(path)


def _region(rid, x, y, w, h, phrase="a red box"):
    return {"region_id": rid, "x": x, "y": y, "width": w, "height": h, "phrase": phrase}


def test_vg_item_regions_clipped_dropped_and_grouped(tmp_path):
    img = _jpeg(tmp_path / "1.jpg")
    item = {"image_id": 1, "split": "train", "source": "vg", "paths": [str(tmp_path / "none.jpg"), img],
            "coco_id": None, "meta_size": [100, 80], "sentences": None, "proposals": None,
            "regions": [_region(10, 10, 10, 40, 30),              # kept as is
                        _region(11, 11, 10, 40, 30, "A Red box!"),  # IoU >= 0.7 with 10: one group
                        _region(12, 90, 70, 50, 50),              # clipped to [90, 70, 100, 80]
                        _region(13, 5, 5, 0, 10),                 # zero width: degenerate
                        _region(14, 5, 5, 10, 10, "  !! "),       # no word left: empty caption
                        {"region_id": 15, "x": "abc"}]}           # malformed
    counts = ChunkCounts()
    jpg, meta = build_sample(item, PARAMS, counts)
    assert jpg == open(img, "rb").read()                          # the first path that exists, copied
    assert [r["id"] for r in meta["regions"]] == [10, 11, 12]
    assert meta["regions"][2]["box"] == [90, 70, 100, 80]
    assert meta["regions"][1]["tokens"] == ["a", "red", "box"]
    assert [g["region_ids"] for g in meta["groups"]] == [[10, 11], [12]]
    assert counts.tally.dropped_dict()["regions"] == {"bad_region": 1, "degenerate_box": 1, "empty_caption": 1}
    assert counts.info["boxes_clipped"] == 1


def test_karpathy_item_sentences_and_proposals(tmp_path):
    item = {"image_id": 7, "split": "val", "source": "karpathy", "paths": [_jpeg(tmp_path / "7.jpg")],
            "coco_id": 70, "meta_size": None, "regions": None,
            "sentences": ["Two dogs.", "", 5], "proposals": [[0, 0, 50, 50], [10, 10, 10, 40], "x", [90, 70, 200, 90]]}
    counts = ChunkCounts()
    _, meta = build_sample(item, PARAMS, counts)
    assert [s["tokens"] for s in meta["sentences"]] == [["two", "dogs"]]
    assert meta["proposals"] == [[0, 0, 50, 50], [90, 70, 100, 80]]
    assert counts.info["proposals_dropped"] == 2
    assert counts.tally.dropped_dict()["sentences"] == {"empty_caption": 1, "bad_sentence": 1}


def test_dropped_items_take_everything_with_them(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    counts = ChunkCounts()
    missing = {"image_id": 1, "source": "vg", "split": "train", "paths": [str(tmp_path / "gone.jpg")],
               "regions": [_region(1, 0, 0, 5, 5)], "sentences": None}
    corrupt = {"image_id": 2, "source": "karpathy", "split": "train", "paths": [str(bad)],
               "regions": None, "sentences": ["a", "b"]}
    assert build_sample(missing, PARAMS, counts) is None
    assert build_sample(corrupt, PARAMS, counts) is None
    assert counts.tally.dropped_dict()["images"] == {"missing_file": 1, "corrupt_image": 1}
    assert counts.tally.dropped_dict()["regions"] == {"missing_file": 1}
    assert counts.tally.dropped_dict()["sentences"] == {"corrupt_image": 2}


def test_process_chunk_writes_shards_and_a_balanced_record(tmp_path):
    items = [{"image_id": i, "split": "train" if i < 3 else "test", "source": "vg",
              "paths": [_jpeg(tmp_path / f"{i}.jpg")], "coco_id": None, "meta_size": None,
              "regions": [_region(100 + i, 1, 1, 20, 20, "a red box")], "sentences": None, "proposals": None}
             for i in range(4)]
    items.append({"image_id": 9, "split": "train", "source": "vg", "paths": [str(tmp_path / "gone.jpg")],
                  "regions": [_region(1, 0, 0, 5, 5), _region(2, 0, 0, 6, 6)], "sentences": None})
    out = tmp_path / "out"
    fp = fingerprint(PARAMS, items)
    rec = process_chunk(3, items, str(out), PARAMS, fp)
    assert rec == read_record(str(out), 3)
    assert rec["fingerprint"] == fp and rec["chunk"] == 3
    tally = Tally.from_dict(rec, "record")
    assert tally.dropped_dict()["images"] == {"missing_file": 1}
    assert rec["counts"]["train"]["images"] == 3 and rec["counts"]["test"]["images"] == 1
    for kind, n_in in (("images", 5), ("regions", 6)):
        written = sum(c[kind] for c in rec["counts"].values())
        assert tally.inputs[kind] == n_in == written + tally.dropped_total(kind)
    assert rec["tokens"] == {"a": 3, "red": 3, "box": 3} and rec["train_captions"] == 3
    keys = {split: [k for k, _, _ in iter_samples(str(out), split)] for split in ("train", "test")}
    assert keys == {"train": ["0", "1", "2"], "test": ["3"]}
    assert {s["split"]: s["samples"] for s in rec["shards"]} == {"train": 3, "test": 1}
    assert all(s["name"].split("-")[1].startswith("00") for s in rec["shards"])
    json.dumps(rec)   # the record is plain JSON


def test_fingerprint_follows_metadata_and_params(tmp_path):
    items = [{"image_id": 1, "split": "train", "source": "vg", "paths": [_jpeg(tmp_path / "1.jpg")],
              "regions": [_region(1, 0, 0, 5, 5, "a cat")], "sentences": None}]
    fp = fingerprint(PARAMS, items)
    assert fingerprint(PARAMS, [dict(items[0])]) == fp
    edited = [dict(items[0], regions=[_region(1, 0, 0, 5, 5, "a dog")])]
    assert fingerprint(PARAMS, edited) != fp
    assert fingerprint(dict(PARAMS, iou_threshold=0.5), items) != fp
