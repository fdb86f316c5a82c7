"""`dvsa search`: on a hand-set alignment model whose region score for "red" is the box's mean
redness, the top regions are exactly the proposals of the red objects."""

from __future__ import annotations

import json

import pytest
from eval_fixtures import colour_aligner, prepare_shards, save, tiny_cfg
from PIL import Image

from dvsa.boxes import iou
from dvsa.cli import main


@pytest.fixture(scope="module")
def world(synth_world, tmp_path_factory):
    shards = prepare_shards(synth_world, tmp_path_factory.mktemp("search_shards"))
    truth = json.loads((synth_world / "truth.json").read_text())
    return shards, {img["image_id"]: img for img in truth["images"]}


@pytest.fixture(scope="module")
def model_ckpt(world, tmp_path_factory):
    from dvsa.data.shards import load_vocab

    shards, _ = world
    d = tmp_path_factory.mktemp("search_ckpt")
    vocab = load_vocab(str(shards / "kp"))
    cfg = tiny_cfg(shards, d, "task=align", "data.image_size=96")
    model = colour_aligner(cfg, vocab)
    return model, vocab, cfg, save(model, vocab, cfg, d / "ckpt")


def _objects(truth, split, colour, max_images):
    imgs = [t for t in truth.values() if t["split"] == split][:max_images]
    return imgs, [(t["image_id"], o["box"]) for t in imgs for o in t["objects"] if o["colour"] == colour]


@pytest.mark.parametrize("colour", ["red", "blue"])
def test_search_finds_every_object_of_the_colour_first(world, model_ckpt, colour):
    from dvsa.inference.search import search

    shards, truth = world
    model, vocab, cfg, _ = model_ckpt
    found = search(model, vocab, cfg, str(shards / "kp"), f"a {colour} shape", split="train", top=40,
                   max_images=20)
    # the shards hold images in their own order: take the truth of the same 20 images
    from dvsa.data.shards import iter_samples

    ids = [meta["image_id"] for _, _, meta in iter_samples(str(shards / "kp"), "train")][:20]
    wanted = [(i, o["box"]) for i in ids for o in truth[i]["objects"] if o["colour"] == colour]
    assert wanted, "the world has objects of this colour among the first 20 images"
    assert found["images"] == 20
    assert found["regions"] == sum(len(truth[i]["objects"]) for i in ids)      # one proposal per object
    top = found["results"][: len(wanted)]
    for r in top:   # each of the top-|wanted| regions is a proposal of an object of that colour
        boxes = [b for i, b in wanted if i == r["image_id"]]
        assert boxes and max(iou(r["box"], b) for b in boxes) > 0.7, r
    assert len({(r["image_id"], tuple(r["box"])) for r in top}) == len(wanted)
    assert all(a["score"] >= b["score"] for a, b in zip(found["results"], found["results"][1:]))
    assert top[-1]["score"] > 0 and found["results"][len(wanted)]["score"] < top[-1]["score"] / 2


def test_search_command_prints_and_draws(world, model_ckpt, tmp_path, capsys):
    shards, truth = world
    *_, ckpt = model_ckpt
    out = tmp_path / "s"
    assert main(["search", "red zebra", "--checkpoint", str(ckpt), "--shards", str(shards / "kp"),
                 "--split", "train", "--top", "3", "--max-images", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "words not in the vocabulary, ignored: zebra" in printed
    assert "top 3 of" in printed and printed.count("image ") >= 3
    with Image.open(out / "search_red_zebra.png") as im:
        assert im.size == (4 * 240, 240 + 60)


def test_search_rejects_an_unknown_query_and_missing_shards(world, model_ckpt, tmp_path, capsys):
    shards, _ = world
    *_, ckpt = model_ckpt
    assert main(["search", "zebra", "--checkpoint", str(ckpt), "--shards", str(shards / "kp")]) == 1
    assert "none of its words is in the model's vocabulary" in capsys.readouterr().err
    assert main(["search", "red", "--checkpoint", str(ckpt), "--shards", str(tmp_path / "none")]) == 1
    assert "no such shard directory" in capsys.readouterr().err
