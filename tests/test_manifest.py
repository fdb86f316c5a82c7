"""The shard-set contract (dvsa.data.manifest): a manifest round-trips, refuses to be written
unbalanced, reads every bad file as one DataError line, records shard checksums equal to the
files, and works the same on a remote (fsspec memory://) shard set."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter

import fsspec
import pytest

from dvsa.data.manifest import (
    FORMAT,
    MANIFEST,
    FeatureManifest,
    FeatureSplit,
    Manifest,
    ShardRecord,
    SplitCounts,
    Tally,
)
from dvsa.data.shards import ShardWriter, list_shards, load_vocab, parse_row
from dvsa.errors import DataError
from dvsa.text import Vocab

VOCAB = Vocab.build(Counter({"a": 3, "dog": 2}), 1, 2)


def small_manifest(**changes) -> Manifest:
    """3 images in (one dropped as corrupt), 4 regions in (one dropped as degenerate), two shards."""
    tally = Tally()
    tally.count_in(images=3, regions=4)
    tally.drop("corrupt_image", images=1, regions=1)
    tally.drop("degenerate_box", regions=1)
    m = Manifest(source="vg", params={"min_count": 1, "max_side": None}, tally=tally,
                 splits={"train": SplitCounts(images=1, regions=1, groups=1), "val": SplitCounts(images=1, regions=1,
                                                                                                 groups=1)},
                 shards=[ShardRecord("val-000000.tar", "val", 1, 1024, "ab" * 32),
                         ShardRecord("train-000000.tar", "train", 1, 2048, "cd" * 32)],
                 info={"boxes_clipped": 2}, coco_ids={"train": [7]},
                 input_details={"files": {"x.json": {"bytes": 5}}, "image_bytes_read": 99},
                 sections={"run": {"seconds": 1.5}, "leakage": {"images": 0}})
    return dataclasses.replace(m, **changes)


def test_round_trip_keeps_every_section(tmp_path):
    m = small_manifest()
    m.write(str(tmp_path), VOCAB)
    back = Manifest.read(str(tmp_path))
    assert back == m
    assert m.vocab.size == len(VOCAB) == back.vocab.size and load_vocab(str(tmp_path)) == VOCAB
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk["format"] == FORMAT
    assert on_disk["inputs"] == {"images": 3, "regions": 4, "sentences": 0, "files": {"x.json": {"bytes": 5}},
                                 "image_bytes_read": 99}
    assert on_disk["written"] == {"images": 2, "regions": 2, "sentences": 0}
    assert on_disk["dropped"] == {"images": {"corrupt_image": 1}, "regions": {"corrupt_image": 1, "degenerate_box": 1},
                                  "sentences": {}}
    assert on_disk["splits"]["train"] == {"images": 1, "regions": 1, "groups": 1, "sentences": 0, "shards": 1}
    assert [s["name"] for s in on_disk["shards"]] == ["train-000000.tar", "val-000000.tar"]   # sorted by name
    assert on_disk["shards"][0] == {"name": "train-000000.tar", "split": "train", "samples": 1, "bytes": 2048,
                                    "sha256": "cd" * 32}
    assert on_disk["run"] == {"seconds": 1.5} and on_disk["leakage"] == {"images": 0}
    assert m.split_count("train", "images") == 1 and m.split_count("train", "shards") == 1
    assert m.split_count("test", "images") == 0
    assert m.dropped("regions") == {"corrupt_image": 1, "degenerate_box": 1}


def test_a_set_without_checksums_still_reads(tmp_path):
    """Shard sets written before checksums were recorded: shards have no sha256, nothing else changes."""
    d = small_manifest().to_dict()
    for s in d["shards"]:
        del s["sha256"]
    (tmp_path / MANIFEST).write_text(json.dumps(d))
    m = Manifest.read(str(tmp_path))
    assert [s.sha256 for s in m.shards] == [None, None]
    assert m.to_dict() == d


@pytest.mark.parametrize("kind, change", [
    ("images", lambda t: t.count_in(images=1)),
    ("regions", lambda t: t.drop("degenerate_box", regions=1)),
    ("sentences", lambda t: t.count_in(sentences=2)),
])
def test_an_unbalanced_manifest_is_never_written(tmp_path, kind, change):
    m = small_manifest()
    change(m.tally)
    with pytest.raises(DataError, match=f"manifest does not balance for {kind}: "):
        m.write(str(tmp_path))
    assert not (tmp_path / MANIFEST).exists()


def test_shards_must_hold_the_images_written(tmp_path):
    m = small_manifest()
    m.shards[0] = dataclasses.replace(m.shards[0], samples=5)
    with pytest.raises(DataError, match="shards hold 6 samples but 2 images were written"):
        m.check_balance()


def _bad(tmp_path, text: str) -> str:
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(DataError) as e:
        Manifest.read(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / MANIFEST) + ": ")
    return msg[len(str(tmp_path / MANIFEST)) + 2:]


def test_every_bad_manifest_is_one_line(tmp_path):
    good = small_manifest().to_dict()
    with pytest.raises(DataError, match=r"manifest.json: no such file \(run `dvsa prepare` first\)$"):
        Manifest.read(str(tmp_path / "nowhere"))
    assert _bad(tmp_path, '{"format": ').startswith("invalid JSON at line 1, column 12")
    assert _bad(tmp_path, "[1, 2]") == "the top level is a list, not an object"
    assert _bad(tmp_path, json.dumps({**good, "format": "dvsa-shards/0"})) == \
        "format is 'dvsa-shards/0', not 'dvsa-shards/1' (not a shard set this dvsa reads)"
    bad = json.loads(json.dumps(good))
    bad["splits"]["train"]["images"] = "many"
    assert _bad(tmp_path, json.dumps(bad)) == "splits.train.images is 'many', not a number"
    bad = json.loads(json.dumps(good))
    bad["dropped"]["regions"]["degenerate_box"] = -1
    assert _bad(tmp_path, json.dumps(bad)) == "dropped.regions.degenerate_box is -1, not a count"
    bad = json.loads(json.dumps(good))
    bad["shards"][1]["samples"] = None
    assert _bad(tmp_path, json.dumps(bad)) == "shards[1].samples is None, not a number"
    assert _bad(tmp_path, json.dumps({k: v for k, v in good.items() if k != "inputs"})) == "no 'inputs' section"


def test_shard_writer_checksums_equal_the_files(tmp_path):
    with ShardWriter(str(tmp_path), "train", shard_bytes=3000) as w:
        for i in range(5):
            w.write(f"k{i}", bytes([i]) * 1500, {"image_id": i})
    assert len(w.shards) > 1
    for s in w.shards:
        data = (tmp_path / s.name).read_bytes()
        assert (s.size, s.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert sum(s.samples for s in w.shards) == 5


def test_prepared_shard_checksums_equal_the_files(shards):
    m = Manifest.read(str(shards / "vg"))
    m.check_balance()
    assert m.shards
    for s in m.shards:
        data = (shards / "vg" / s.name).read_bytes()
        assert (s.size, s.sha256) == (len(data), hashlib.sha256(data).hexdigest())


def test_remote_shard_set_through_fsspec_memory():
    root = "memory://dvsa-manifest-test/set"
    with ShardWriter(root, "train", shard_bytes=1 << 20) as w:
        w.write("k0", b"jpeg bytes", {"image_id": 0})
    tally = Tally()
    tally.count_in(images=1)
    m = Manifest(source="vg", params={}, tally=tally, splits={"train": SplitCounts(images=1)}, shards=w.shards)
    m.write(root, VOCAB)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/dvsa-manifest-test/set/manifest.json") and fs.exists("/dvsa-manifest-test/set/vocab.json")
    assert not [p for p in fs.ls("/dvsa-manifest-test/set", detail=False) if ".tmp-" in p]
    assert Manifest.read(root) == m
    assert load_vocab(root) == VOCAB
    [url] = list_shards(root, "train")
    assert url.startswith("memory://") and url.endswith("/set/train-000000.tar")
    with fsspec.open(url, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == m.shards[0].sha256


def test_feature_manifest_round_trip(tmp_path):
    fm = FeatureManifest(feat_dim=128, image_size=32, dtype="float32", source="shards/vg", seed=3,
                         model={"backbone": "tiny"}, splits={"train": FeatureSplit(2, {"corrupt_image": 1})},
                         shards=[ShardRecord("train-000000.tar", "train", 2, 10, "ef" * 32)])
    fm.write(str(tmp_path), VOCAB)
    assert FeatureManifest.read(str(tmp_path)) == fm
    assert json.loads((tmp_path / "features.json").read_text())["splits"] == {
        "train": {"samples": 2, "shards": 1, "skipped": {"corrupt_image": 1}}}
    assert load_vocab(str(tmp_path)) == VOCAB


def test_parse_row_one_rule_for_every_actor():
    batch = {"__key__": ["a", "b", "c", "d", "e"],
             "jpg": [b"J", None, b"J", b"J", b"J"],
             "json": [b'{"image_id": 1}', b'{"image_id": 2}', b"not json", b"[1]", None]}
    rows = [parse_row(batch, i) for i in range(5)]
    assert rows[0] == ("a", b"J", {"image_id": 1}, "")
    assert rows[1] == ("b", b"", {"image_id": 2}, "")          # no payload: the caller decides
    assert [r.meta for r in rows[2:]] == [None, None, None]
    assert rows[3].error == "not an object" and rows[4].error == "no .json member"
    assert rows[2].error.startswith("Expecting value")
    assert parse_row({"__key__": ["x"], "json": [b"{}"]}, 0).data == b""   # no payload column at all
