import json

import numpy as np
import pytest
from PIL import Image

from dvsa.boxes import iou
from dvsa.data.synth import COLOURS, SynthOptions, write_world
from dvsa.errors import DvsaError
from dvsa.text import clean_caption


def load(p):
    return json.loads(p.read_text())


def test_formats_and_consistency(synth_world):
    vg, kp = synth_world / "vg", synth_world / "karpathy"
    image_data = load(vg / "image_data.json")
    regions = load(vg / "region_descriptions.json")
    splits = load(vg / "densecap_splits.json")
    karpathy = load(kp / "dataset_synth.json")
    proposals = load(kp / "proposals.json")
    truth = load(synth_world / "truth.json")

    assert len(image_data) == len(regions) == len(karpathy["images"]) == len(truth["images"]) == 60
    assert set(image_data[0]) == {"image_id", "url", "width", "height", "coco_id", "flickr_id"}
    assert all(e["coco_id"] == e["image_id"] for e in image_data)
    ids = [e["image_id"] for e in image_data]
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(ids)
    assert all(len(splits[s]) >= 1 for s in ("train", "val", "test"))
    folders = {e["url"].split("/")[-2] for e in image_data}
    assert folders == {"VG_100K", "VG_100K_2"}
    for e in image_data:
        folder = e["url"].split("/")[-2]
        with Image.open(vg / folder / f"{e['image_id']}.jpg") as im:
            assert im.size == (e["width"], e["height"]) and im.format == "JPEG"

    split_of = {i: s for s, l in splits.items() for i in l}
    rid = set()
    for entry, t, k in zip(regions, truth["images"], karpathy["images"]):
        assert entry["id"] == t["image_id"] == k["cocoid"]
        assert k["split"] == split_of[k["cocoid"]] == t["split"]
        assert len(k["sentences"]) == 5
        assert 2 <= len(t["objects"]) <= 4
        # regions: one object each, phrase names its colour and shape, box near the true box
        for r, rt in zip(entry["regions"], t["regions"]):
            assert r["region_id"] == rt["region_id"] and r["region_id"] not in rid
            rid.add(r["region_id"])
            o = t["objects"][rt["object"]]
            toks = clean_caption(r["phrase"])
            assert o["colour"] in toks and o["shape"] in toks
            box = [r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]]
            assert iou(box, o["box"]) >= 0.7
        # objects do not overlap
        objs = t["objects"]
        for a in range(len(objs)):
            for b in range(a + 1, len(objs)):
                assert iou(objs[a]["box"], objs[b]["box"]) == 0.0
        # sentences: tokens are the cleaned raw text; each attribute word names its object
        for s, st in zip(k["sentences"], t["sentences"]):
            assert s["tokens"] == st["tokens"] == clean_caption(s["raw"])
            assert len(st["objects"]) == len(st["tokens"]) == len(st["roles"])
            named = set()
            for tok, obj, role in zip(st["tokens"], st["objects"], st["roles"]):
                if role == "other":
                    assert obj == -1
                else:
                    assert objs[obj][role] == tok
                    named.add(obj)
            assert named == set(range(len(objs)))  # a full sentence describes every object
        # proposals: the true boxes, lightly jittered
        props = proposals[str(k["cocoid"])]
        assert len(props) == len(objs)
        for p, o in zip(props, objs):
            assert iou(p, o["box"]) >= 0.8


def test_pixels_show_the_objects(synth_world):
    truth = load(synth_world / "truth.json")
    image_data = {e["image_id"]: e for e in load(synth_world / "vg" / "image_data.json")}
    for t in truth["images"][:20]:
        folder = image_data[t["image_id"]]["url"].split("/")[-2]
        px = np.asarray(Image.open(synth_world / "vg" / folder / f"{t['image_id']}.jpg").convert("RGB"), dtype=float)
        for o in t["objects"]:
            x1, y1, x2, y2 = o["box"]
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2 + 2  # a little below centre: inside triangles too
            centre = px[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            nearest = min(COLOURS, key=lambda c: np.sum((np.array(COLOURS[c]) - centre) ** 2))
            assert nearest == o["colour"]


def test_deterministic_and_seeded(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_world(a, SynthOptions(images=12, image_size=64, seed=3))
    write_world(b, SynthOptions(images=12, image_size=64, seed=3))
    write_world(c, SynthOptions(images=12, image_size=64, seed=4))
    for rel in ("vg/region_descriptions.json", "karpathy/dataset_synth.json", "truth.json", "vg/VG_100K/1.jpg"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "truth.json").read_bytes() != (c / "truth.json").read_bytes()


def test_region_and_sentence_statistics_differ(synth_world):
    truth = load(synth_world / "truth.json")
    regions = load(synth_world / "vg" / "region_descriptions.json")
    region_len = np.mean([len(clean_caption(r["phrase"])) for e in regions for r in e["regions"]])
    sent_len = np.mean([len(s["tokens"]) for t in truth["images"] for s in t["sentences"]])
    assert sent_len > 2 * region_len


def test_cli_synth(tmp_path, capsys):
    from dvsa.cli import main

    assert main(["synth", "--out", str(tmp_path / "w"), "--images", "5", "--seed", "1", "--image-size", "64"]) == 0
    assert len(load(tmp_path / "w" / "vg" / "image_data.json")) == 5
    assert main(["synth", "--out", str(tmp_path / "w"), "--images", "1"]) == 1  # too few: a clear error


def test_false_proposals_are_detector_like_and_leave_the_world_unchanged(tmp_path):
    plain = write_world(tmp_path / "plain", SynthOptions(images=30, image_size=64, seed=4)) and tmp_path / "plain"
    noisy = tmp_path / "noisy"
    write_world(noisy, SynthOptions(images=30, image_size=64, seed=4, false_proposals=3))
    truth = load(noisy / "truth.json")
    assert truth == {**load(plain / "truth.json"), "options": truth["options"]}    # same objects, sentences
    assert truth["options"]["false_proposals"] == 3
    p0, p1 = load(plain / "karpathy" / "proposals.json"), load(noisy / "karpathy" / "proposals.json")
    kinds = {"background": 0, "straddle": 0}
    for t in truth["images"]:
        key, objs = str(t["image_id"]), [o["box"] for o in t["objects"]]
        assert p1[key][:len(objs)] == p0[key]                    # the true objects' proposals come first
        extra = p1[key][len(objs):]
        assert 2 <= len(extra) <= 3                              # one background box may find no room
        for box in extra:
            best = max(iou(box, o) for o in objs)
            assert best < 0.5                                    # no false positive hits an object
            kinds["background" if best < 0.1 else "straddle"] += 1
            assert 0 <= box[0] < box[2] <= t["width"] and 0 <= box[1] < box[3] <= t["height"]
    assert kinds["background"] >= 30 and kinds["straddle"] >= 20
    with pytest.raises(DvsaError, match="--false-proposals must be >= 0"):
        write_world(tmp_path / "bad", SynthOptions(false_proposals=-1))
