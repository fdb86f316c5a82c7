import dataclasses
import json
import re
from collections import Counter

import pytest

from dvsa.boxes import iou
from dvsa.data.manifest import Manifest
from dvsa.data.prepare import KarpathySource, PrepareOptions, VGSource, prepare_karpathy, prepare_vg, summary
from dvsa.data.shards import iter_samples, list_shards, load_vocab
from dvsa.errors import DataError
from dvsa.text import Vocab

LOCAL = PrepareOptions(use_ray=False, progress=False)


def load(p):
    return json.loads(p.read_text())


def vg_source(world, **kw):
    return VGSource(str(world / "vg"), split_file=str(world / "vg" / "densecap_splits.json"), **kw)


def without_run(m: Manifest) -> Manifest:
    return dataclasses.replace(m, sections={k: v for k, v in m.sections.items() if k != "run"})


def samples_of(out):
    return {k: (jpg, meta) for k, jpg, meta in iter_samples(str(out))}


@pytest.fixture(scope="module")
def vg_ray(ray_local, synth_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("vg_ray")
    m = prepare_vg(vg_source(synth_world, min_count=2), str(out),
                   PrepareOptions(chunk_images=16, shard_bytes=40_000, progress=False))
    return out, m


def test_vg_on_ray_balances_and_matches_truth(vg_ray, synth_world):
    out, m = vg_ray
    truth = {t["image_id"]: t for t in load(synth_world / "truth.json")["images"]}
    splits = load(synth_world / "vg" / "densecap_splits.json")
    n_regions = sum(len(t["regions"]) for t in truth.values())

    assert m == Manifest.read(str(out))
    m.check_balance()
    # chunks of 16 images, each of one split (so val and test fill whole shards)
    chunks = sum(-(-len(splits[s]) // 16) for s in ("train", "val", "test"))
    assert m.sections["run"]["ray"] and m.sections["run"]["chunks"] == chunks
    split_of_chunk = {}
    for sh in m.shards:
        chunk = int(sh.name[-10:-4]) // 1000
        assert split_of_chunk.setdefault(chunk, sh.split) == sh.split, sh
    assert len(split_of_chunk) == chunks
    assert m.tally.inputs["images"] == 60 and m.tally.inputs["regions"] == n_regions
    assert m.written == {"images": 60, "regions": n_regions, "sentences": 0}
    assert all(not m.dropped(kind) for kind in ("images", "regions", "sentences"))
    for s in ("train", "val", "test"):
        assert m.split_count(s, "images") == len(splits[s])

    samples = samples_of(out)
    assert len(samples) == 60  # keys unique across shards: no duplicates
    by_shard = Counter()
    for url in list_shards(str(out)):
        name = url.rsplit("/", 1)[-1]
        assert re.fullmatch(r"(train|val|test)-\d{6}\.tar", name)
        for _, _, meta in iter_samples([url]):
            assert meta["split"] == name.split("-")[0]
            by_shard[name] += 1
    assert {s.name: s.samples for s in m.shards} == dict(by_shard)
    assert len(list_shards(str(out), "train")) > 1

    image_data = {e["image_id"]: e for e in load(synth_world / "vg" / "image_data.json")}
    for key, (jpg, meta) in samples.items():
        t = truth[int(key)]
        assert meta["image_id"] == int(key) and meta["source"] == "vg" and meta["coco_id"] == int(key)
        assert (meta["width"], meta["height"]) == (t["width"], t["height"])
        folder = image_data[int(key)]["url"].split("/")[-2]
        assert jpg == (synth_world / "vg" / folder / f"{key}.jpg").read_bytes()  # copied as is
        assert [r["id"] for r in meta["regions"]] == [r["region_id"] for r in t["regions"]]
        obj_of = {r["region_id"]: r["object"] for r in t["regions"]}
        # the IoU >= 0.7 groups recover the objects: one group per object, every phrase kept
        assert len(meta["groups"]) == len(t["objects"])
        for g in meta["groups"]:
            objs = {obj_of[r] for r in g["region_ids"]}
            assert len(objs) == 1
            assert iou(g["box"], t["objects"][objs.pop()]["box"]) >= 0.7
            assert len(g["refs"]) == len(g["tokens"]) == len(g["region_ids"])

    # vocabulary: train-split region phrases only
    regions = {e["id"]: e["regions"] for e in load(synth_world / "vg" / "region_descriptions.json")}
    counter, n = Counter(), 0
    for iid in splits["train"]:
        for r in regions[iid]:
            counter.update(r["phrase"].split())  # synth phrases are already clean
            n += 1
    assert load_vocab(str(out)) == Vocab.build(counter, 2, n)


def test_rerun_skips_finished_chunks(vg_ray, synth_world):
    out, m = vg_ray
    m2 = prepare_vg(vg_source(synth_world, min_count=2), str(out),
                    PrepareOptions(chunk_images=16, shard_bytes=40_000, progress=False))
    assert m2.sections["run"]["chunks_skipped"] == m.sections["run"]["chunks"]
    assert without_run(m2) == without_run(m)


def test_rerun_redoes_the_chunks_whose_inputs_changed(synth_world, tmp_path):
    """A finished chunk is skipped only while its inputs are unchanged: an edited phrase or a
    replaced image file makes the re-run redo that chunk (and only it)."""
    import shutil

    world = tmp_path / "vg"
    shutil.copytree(synth_world / "vg", world)
    source = VGSource(str(world), split_file=str(world / "densecap_splits.json"), min_count=1)
    options = dataclasses.replace(LOCAL, chunk_images=16)
    out = tmp_path / "out"
    first = prepare_vg(source, str(out), options)
    n_chunks = first.sections["run"]["chunks"]
    train = load(world / "densecap_splits.json")["train"]
    regions = load(world / "region_descriptions.json")
    edited = next(e for e in regions if e["id"] == train[0])
    edited["regions"][0]["phrase"] = "a zebra edited afterwards"
    (world / "region_descriptions.json").write_text(json.dumps(regions))
    second = prepare_vg(source, str(out), options)
    assert second.sections["run"]["chunks_skipped"] == n_chunks - 1
    meta = samples_of(out)[str(train[0])][1]
    assert meta["regions"][0]["raw"] == "a zebra edited afterwards"
    # an image replaced by another file (new size and time): its chunk is redone too
    img = next(world.glob(f"VG_100K*/{train[-1]}.jpg"))
    img.write_bytes(next(world.glob(f"VG_100K*/{train[0]}.jpg")).read_bytes())
    third = prepare_vg(source, str(out), options)
    assert third.sections["run"]["chunks_skipped"] == n_chunks - 1
    assert samples_of(out)[str(train[-1])][0] == img.read_bytes()
    assert prepare_vg(source, str(out), options).sections["run"]["chunks_skipped"] == n_chunks


def test_killed_run_resumes_without_loss_or_duplicates(synth_world, tmp_path, monkeypatch):
    import dvsa.data.prepare as prep

    options = dataclasses.replace(LOCAL, chunk_images=16, shard_bytes=40_000)
    clean = prepare_vg(vg_source(synth_world), str(tmp_path / "clean"), options)
    out = tmp_path / "killed"
    real = prep.process_chunk

    def dies_in_chunk_2(chunk, items, out_, params, fp):
        if chunk == 2:
            # what a SIGKILL mid-chunk leaves: a finished shard of the chunk, a temp file, no record
            (out / "train-002000.tar").write_bytes(b"partial")
            (out / ".train-002001.tar.tmp-deadbeef").write_bytes(b"half")
            raise KeyboardInterrupt("killed")
        return real(chunk, items, out_, params, fp)

    monkeypatch.setattr(prep, "process_chunk", dies_in_chunk_2)
    with pytest.raises(KeyboardInterrupt):
        prepare_vg(vg_source(synth_world), str(out), options)
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(prep, "process_chunk", real)
    m = prepare_vg(vg_source(synth_world), str(out), options)
    assert m.sections["run"]["chunks_skipped"] == 2
    assert m.shards == clean.shards and m.splits == clean.splits
    assert not any(".tmp-" in p.name for p in out.rglob("*"))
    keys = [k for k, _, _ in iter_samples(str(out))]
    assert len(keys) == len(set(keys)) == 60
    assert samples_of(out) == samples_of(tmp_path / "clean")


def test_fsspec_memory_output(synth_world):
    m = prepare_vg(vg_source(synth_world), "memory://dvsa-tests/vg", LOCAL)
    urls = list_shards("memory://dvsa-tests/vg", "val")
    assert urls and all(u.startswith("memory://") for u in urls)
    assert sum(1 for _ in iter_samples("memory://dvsa-tests/vg")) == m.written["images"] == 60
    assert len(load_vocab("memory://dvsa-tests/vg")) == m.vocab.size
    assert Manifest.read("memory://dvsa-tests/vg") == m


def test_split_without_file(synth_world, tmp_path):
    m = prepare_vg(VGSource(str(synth_world / "vg"), val_images=5, test_images=7), str(tmp_path), LOCAL)
    assert [m.split_count(s, "images") for s in ("train", "val", "test")] == [48, 5, 7]
    assert m.params["val_images"] == 5


def test_max_side_downscales_once(synth_world, tmp_path):
    from io import BytesIO

    from PIL import Image

    m = prepare_vg(vg_source(synth_world), str(tmp_path), dataclasses.replace(LOCAL, max_side=48))
    truth = {t["image_id"]: t for t in load(synth_world / "truth.json")["images"]}
    regions = {r["region_id"]: r for e in load(synth_world / "vg" / "region_descriptions.json") for r in e["regions"]}
    assert m.info["images_downscaled"] == 60
    for key, jpg, meta in iter_samples(str(tmp_path)):
        im = Image.open(BytesIO(jpg))
        assert im.size == (meta["width"], meta["height"]) and max(im.size) == 48
        t = truth[int(key)]
        sx, sy = meta["width"] / t["width"], meta["height"] / t["height"]
        r = meta["regions"][0]
        src = regions[r["id"]]
        assert r["box"] == pytest.approx([src["x"] * sx, src["y"] * sy, (src["x"] + src["width"]) * sx,
                                          (src["y"] + src["height"]) * sy], abs=0.01)


def test_karpathy_with_proposals_and_leakage_guard(synth_world, tmp_path):
    vg_out = tmp_path / "vg"
    prepare_vg(vg_source(synth_world), str(vg_out), LOCAL)
    kp_json = synth_world / "karpathy" / "dataset_synth.json"

    def kp_source(json_path, vg_shards=vg_out):
        return KarpathySource(str(json_path), str(synth_world / "vg"),
                              proposals=str(synth_world / "karpathy" / "proposals.json"), vg_shards=str(vg_shards))

    m = prepare_karpathy(kp_source(kp_json), str(tmp_path / "kp"), LOCAL)
    m.check_balance()
    assert m.written == {"images": 60, "regions": 0, "sentences": 300}
    assert m.sections["leakage"]["images"] == 0
    truth = {t["image_id"]: t for t in load(synth_world / "truth.json")["images"]}
    for key, _, meta in iter_samples(str(tmp_path / "kp")):
        t = truth[int(key)]
        assert meta["source"] == "karpathy" and meta["split"] == t["split"]
        assert [s["tokens"] for s in meta["sentences"]] == [s["tokens"] for s in t["sentences"]]
        assert len(meta["proposals"]) == len(t["objects"])

    # crafted overlap: two VG test images put in the Karpathy train split
    d = load(kp_json)
    vg_test = load(synth_world / "vg" / "densecap_splits.json")["test"][:2]
    for e in d["images"]:
        if e["cocoid"] in vg_test:
            e["split"] = "train"
    leaky = tmp_path / "leaky.json"
    leaky.write_text(json.dumps(d))
    m = prepare_karpathy(kp_source(leaky), str(tmp_path / "kp2"), LOCAL)
    assert m.sections["leakage"]["images"] == 2
    assert m.sections["leakage"]["examples"] == sorted(vg_test)
    # the other direction: VG prepared after (or again) against those Karpathy shards
    m_vg = prepare_vg(vg_source(synth_world, karpathy_shards=str(tmp_path / "kp2")), str(tmp_path / "vg2"), LOCAL)
    assert m_vg.sections["leakage"]["images"] == 2 and m_vg.sections["leakage"]["examples"] == sorted(vg_test)
    assert "2 VG val/test images in the Karpathy train split" in summary(m_vg)
    # shards of the wrong source are refused, not silently compared
    with pytest.raises(DataError, match="holds 'karpathy' shards, not 'vg'"):
        prepare_karpathy(kp_source(kp_json, vg_shards=tmp_path / "kp2"), str(tmp_path / "kp3"), LOCAL)


def test_check_balance_detects_a_mismatch(vg_ray):
    _, m = vg_ray
    bad = Manifest.from_dict(m.to_dict())
    bad.tally.count_in(regions=1)
    with pytest.raises(DataError, match="does not balance for regions"):
        bad.check_balance()
    bad = Manifest.from_dict(m.to_dict())
    bad.shards[0] = dataclasses.replace(bad.shards[0], samples=bad.shards[0].samples + 1)
    with pytest.raises(DataError, match="shards hold"):
        bad.check_balance()


def test_cli_prepare(synth_world, tmp_path, capsys):
    from dvsa.cli import main

    rc = main(["prepare", "vg", "--root", str(synth_world / "vg"), "--split-file",
               str(synth_world / "vg" / "densecap_splits.json"), "--out", str(tmp_path / "o"), "--no-ray", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "train" in out and "vocab:" in out
    rc = main(["prepare", "karpathy", "--json", str(tmp_path / "missing.json"), "--images-root", str(tmp_path),
               "--out", str(tmp_path / "k"), "--no-ray", "--quiet"])
    assert rc == 1
    assert "missing.json: no such file" in capsys.readouterr().err
