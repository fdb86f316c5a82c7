"""MRF snippet alignment: known unaries, snippet -> region conversion, and the Ray Data job
writing region-snippet shards whose manifest balances (bad samples counted, never lost)."""

from __future__ import annotations

import json

import pytest
import torch

from dvsa.config import Config
from dvsa.data.groups import region_groups
from dvsa.data.manifest import Manifest
from dvsa.experiments.snippets import (
    SnippetOptions,
    alignment_figure,
    first_sample,
    snippet_regions,
    snippet_sample,
    write_snippet_shards,
)
from dvsa.inference.alignment import align_sentences, alignment_boxes, encode_sentences
from dvsa.models.alignment import AlignmentModel


class _Vocab:
    """Just what encode_sentences needs: word -> id (unknown -> 3)."""

    stoi = {"red": 4, "circle": 5, "blue": 6}

    def ids(self, tokens):
        return [self.stoi.get(w, 3) for w in tokens]


def _onehot_model() -> AlignmentModel:
    """Bag-of-words sentence encoder whose s_t is the one-hot vector of word t (ids 4, 5, 6 ->
    e0, e1, e2): then v_i^T s_t = v_i[word_t], a unary we know exactly."""
    cfg = Config().replace(**{"model.backbone": "tiny", "model.word_dim": 3, "model.hidden_dim": 3,
                              "model.embed_dim": 3, "align.sentence_encoder": "bow"})
    model = AlignmentModel(cfg.model, cfg.align, vocab_size=7, with_encoder=False, feat_dim=4).eval()
    enc = model.sentence
    with torch.no_grad():
        enc.W_w.weight.zero_()
        enc.W_w.weight[4:7] = torch.eye(3)
        enc.W_e.weight.copy_(torch.eye(3))
        enc.W_e.bias.zero_()
        enc.W_d.weight.copy_(torch.eye(3))
        enc.W_d.bias.zero_()
    return model


def test_known_unary_argmax_versus_mrf():
    model = _onehot_model()
    #          red  circle blue
    v = torch.tensor([[[0.5, 0.5, 0.5],    # box 0: the whole image
                       [2.0, 0.4, 0.0],    # box 1: the red circle
                       [0.0, 0.0, 2.0]]])  # box 2: the blue thing
    v_mask = torch.ones(1, 3, dtype=torch.bool)
    tokens, lengths = encode_sentences(_Vocab(), [["red", "circle", "blue"], ["blue"]])
    assert tokens.tolist() == [[4, 5, 6], [6, 0, 0]] and lengths.tolist() == [3, 1]
    sent_img = torch.tensor([0, 0])
    assign, unary = align_sentences(model, v, v_mask, sent_img, tokens, lengths, beta=0.0)
    assert torch.allclose(unary[0], torch.tensor([[0.5, 2.0, 0.0], [0.5, 0.4, 0.0], [0.5, 0.0, 2.0]]))
    # beta = 0: each word its own best box; "circle" goes to the whole image (0.5 > 0.4)
    assert assign.tolist() == [[1, 0, 2], [2, -1, -1]]
    # beta = 0.5: [1, 1, 2] scores 2 + 0.4 + 2 + 0.5 = 4.9 > 4.5 of [1, 0, 2]
    assign, _ = align_sentences(model, v, v_mask, sent_img, tokens, lengths, beta=0.5)
    assert assign.tolist() == [[1, 1, 2], [2, -1, -1]]
    # a large beta: one box for the whole sentence (box 1: 2.4 + 2 beta beats box 0's 1.5 + 2 beta)
    assign, _ = align_sentences(model, v, v_mask, sent_img, tokens, lengths, beta=10.0)
    assert assign[0].tolist() == [1, 1, 1]


def test_snippet_regions_from_given_assignment():
    boxes = [[0, 0, 100, 80], [10, 10, 40, 40], [50, 20, 90, 60]]
    toks = ["a", "red", "circle", "and", "a", "blue", "square", "on", "gray"]
    assign = [1, 1, 1, 0, 2, 2, 2, 0, 0, -1, -1]   # padding after the 9 words is ignored
    regions, left = snippet_regions(toks, assign, boxes, sentence=3, first_id=5)
    assert left == 0
    assert [(r["id"], r["raw"], r["box"], r["span"]) for r in regions] == [
        (5, "a red circle", [10.0, 10.0, 40.0, 40.0], [3, 0, 3]),
        (6, "and", [0.0, 0.0, 100.0, 80.0], [3, 3, 4]),
        (7, "a blue square", [50.0, 20.0, 90.0, 60.0], [3, 4, 7]),
        (8, "on gray", [0.0, 0.0, 100.0, 80.0], [3, 7, 9]),
    ]
    assert sum((r["tokens"] for r in regions), []) == toks        # snippets partition the sentence
    regions, left = snippet_regions(toks, assign, boxes, sentence=0, first_id=1, include_full_image=False)
    assert left == 2 and [r["raw"] for r in regions] == ["a red circle", "a blue square"]
    assert [r["id"] for r in regions] == [1, 2]
    with pytest.raises(ValueError, match="box 7"):
        snippet_regions(["x"], [7], boxes, sentence=0, first_id=1)


def test_snippet_sample_regroups_identical_boxes():
    boxes = [[0, 0, 100, 80], [10, 10, 40, 40], [50, 20, 90, 60]]
    meta = {"image_id": 9, "source": "karpathy", "split": "train", "width": 100, "height": 80,
            "regions": [{"id": 1, "box": [0, 0, 1, 1], "raw": "old", "tokens": ["old"]}], "groups": [],
            "sentences": [], "proposals": boxes[1:]}
    sents = [{"raw": "A red circle.", "tokens": ["a", "red", "circle"]},
             {"raw": "Red circle, blue square", "tokens": ["red", "circle", "blue", "square"]}]
    assign = torch.tensor([[1, 1, 1, -1], [1, 1, 2, 2]])
    new, found, left = snippet_sample(meta, assign, boxes, sents)
    assert (found, left) == (3, 0)
    assert [r["raw"] for r in new["regions"]] == ["a red circle", "red circle", "blue square"]
    assert [r["id"] for r in new["regions"]] == [1, 2, 3]
    # the two snippets on box 1 form one group with both captions as references
    assert [(g["region_ids"], g["refs"]) for g in new["groups"]] == [
        ([1, 2], ["a red circle", "red circle"]), ([3], ["blue square"])]
    assert new["groups"] == region_groups(new["regions"])
    assert new["sentences"] == sents and new["proposals"] == boxes[1:] and new["image_id"] == 9


def test_alignment_boxes_follow_training_ingest():
    meta = {"width": 100, "height": 80, "proposals": [[1, 2, 30, 40], [5, 5, 5, 9], [50, 20, 90, 60]],
            "regions": [{"box": [0, 0, 9, 9], "tokens": ["x"]}]}
    # the whole image, then the valid proposals (the degenerate one is skipped), capped at M - 1
    assert alignment_boxes(meta, 8) == [[0, 0, 100, 80], [1, 2, 30, 40], [50, 20, 90, 60]]
    assert alignment_boxes(meta, 2) == [[0, 0, 100, 80], [1, 2, 30, 40]]
    no_props = {"width": 100, "height": 80, "regions": [{"box": [0, 0, 9, 9], "tokens": ["x"]}]}
    assert alignment_boxes(no_props, 8) == [[0, 0, 100, 80], [0, 0, 9, 9]]


def test_without_the_whole_image_training_and_alignment_see_the_same_proposals():
    """align.whole_image=false: up to M proposals, no whole-image box (unless there is no
    other box), and the training batch holds exactly the boxes the MRF later aligns to."""
    import numpy as np

    from dvsa.ingest.builder import BatchBuilder, IngestSpec
    from dvsa.text import Vocab

    meta = {"width": 100, "height": 80, "proposals": [[1, 2, 30, 40], [5, 5, 5, 9], [50, 20, 90, 60]],
            "regions": [], "sentences": [{"tokens": ["x"]}]}
    assert alignment_boxes(meta, 8, whole_image=False) == [[1, 2, 30, 40], [50, 20, 90, 60]]
    assert alignment_boxes(meta, 1, whole_image=False) == [[1, 2, 30, 40]]
    bare = {"width": 100, "height": 80}
    assert alignment_boxes(bare, 8, whole_image=False) == [[0, 0, 100, 80]]

    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (100, 80)).save(buf, "JPEG")
    vocab = Vocab.build({"x": 3}, 1, 1)
    for whole in (True, False):
        spec = IngestSpec(layout="align", image_size=50, rows=4, max_len=8, randomize=False, whole_image=whole)
        out = BatchBuilder(spec, vocab)({"__key__": np.array(["k"]), "jpg": np.array([buf.getvalue()], dtype=object),
                                                   "json": np.array([json.dumps(meta).encode()], dtype=object)})
        want = [[v * 0.5 if i % 2 == 0 else v * 50 / 80 for i, v in enumerate(b)]
                for b in alignment_boxes(meta, 4, whole_image=whole)]
        got = out["boxes"][0][out["box_mask"][0].astype(bool)].tolist()
        assert np.allclose(got, want) and len(got) == (3 if whole else 2)


# --------------------------------------------------------------------------- the Ray Data job


def _tiny_align_cfg(shards: str) -> Config:
    return Config().replace(**{
        "task": "align", "data.fullframe_shards": shards, "data.image_size": 32, "data.max_regions": 6,
        "model.backbone": "tiny", "model.roi_size": 2, "model.embed_dim": 16, "model.word_dim": 8,
        "model.hidden_dim": 16, "align.mrf_beta": 0.5})


@pytest.fixture(scope="module")
def snippet_job(tmp_path_factory, synth_world, ray_local):
    """Karpathy shards of the synth world, one train shard doctored (a corrupt JPEG, an image
    with no sentence), a random tiny alignment model checkpoint, and the job's output."""
    import dataclasses

    from dvsa.data.prepare import KarpathySource, PrepareOptions, prepare_karpathy
    from dvsa.data.shards import ShardWriter, iter_samples, load_vocab
    from dvsa.models.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("snip")
    clean = tmp / "karpathy"
    prepare_karpathy(KarpathySource(str(synth_world / "karpathy" / "dataset_synth.json"), str(synth_world / "vg"),
                                    proposals=str(synth_world / "karpathy" / "proposals.json"), min_count=1),
                     str(clean), PrepareOptions(use_ray=False, progress=False))
    # a doctored copy: train sample 0 gets a truncated JPEG, sample 1 loses its sentences
    src = tmp / "doctored"
    manifest = Manifest.read(str(clean))
    shards = []
    for split in ("train", "val"):
        with ShardWriter(str(src), split, 1 << 30) as w:
            for k, (key, jpg, meta) in enumerate(iter_samples(str(clean), split)):
                if split == "train" and k == 0:
                    jpg = jpg[: len(jpg) // 3]
                if split == "train" and k == 1:
                    manifest.splits["train"].sentences -= len(meta["sentences"])
                    manifest.tally.drop("doctored", sentences=len(meta["sentences"]))
                    meta["sentences"] = []
                w.write(key, jpg, meta)
        shards += w.shards
    test = manifest.splits.pop("test")     # not copied
    manifest.tally.drop("not_copied", images=test.images, sentences=test.sentences)
    manifest = dataclasses.replace(manifest, shards=shards)
    manifest.write(str(src), load_vocab(str(clean)))

    cfg = _tiny_align_cfg(str(src))
    vocab = load_vocab(str(src))
    torch.manual_seed(0)
    model = AlignmentModel(cfg.model, cfg.align, len(vocab))
    ckpt = save_checkpoint(tmp / "ckpt", model=model, step=0, epoch=0, vocab=vocab, cfg=cfg)
    out = tmp / "snippets"
    m = write_snippet_shards(str(ckpt), str(src), str(out), SnippetOptions(splits=("train", "val"), batch_size=8))
    return {"src": src, "out": out, "manifest": m, "ckpt": ckpt, "src_manifest": manifest}


def test_job_manifest_balances_and_counts_bad_samples(snippet_job):
    m, src_m = snippet_job["manifest"], snippet_job["src_manifest"]
    assert m.source == "snippets" and m.params["beta"] == 0.5
    n_in = src_m.split_count("train", "images") + src_m.split_count("val", "images")
    assert m.tally.inputs["images"] == n_in
    assert m.dropped("images") == {"corrupt_image": 1, "no_sentence": 1}
    assert m.written["images"] == n_in - 2
    for kind in ("sentences", "regions"):
        assert m.tally.inputs[kind] == m.written[kind] + sum(m.dropped(kind).values())
    assert Manifest.read(str(snippet_job["out"])) == m and (snippet_job["out"] / "vocab.json").is_file()
    on_disk = json.loads((snippet_job["out"] / "manifest.json").read_text())
    assert set(on_disk) == {"format", "source", "params", "inputs", "written", "splits", "shards", "dropped",
                            "info", "vocab", "coco_ids", "run"}


def test_job_output_equals_in_process_alignment(snippet_job):
    """Every written sample: regions = the MRF snippets of its sentences, as computed here
    in-process with the same model, and the snippets of each sentence partition it."""
    from dvsa.data.shards import iter_samples
    from dvsa.inference.alignment import embed_images
    from dvsa.inference.checkpoints import load_trained

    model, vocab, cfg = load_trained(str(snippet_job["ckpt"]))
    src = {key: (jpg, meta) for key, jpg, meta in iter_samples(str(snippet_job["src"]), "val")}
    got = list(iter_samples(str(snippet_job["out"]), "val"))
    assert [k for k, _, _ in got] == list(src)          # same samples, same order
    for key, jpg, meta in got:
        src_jpg, src_meta = src[key]
        assert jpg == src_jpg                           # the JPEG is copied
        boxes = alignment_boxes(src_meta, cfg.data.max_regions)
        v, vm = embed_images(model, [jpg], [boxes], cfg.data.image_size)
        sents = src_meta["sentences"]
        tokens, lengths = encode_sentences(vocab, [s["tokens"] for s in sents])
        assign, _ = align_sentences(model, v, vm, torch.zeros(len(sents), dtype=torch.long), tokens, lengths, 0.5)
        want, _, _ = snippet_sample(src_meta, assign, boxes, sents)
        assert meta["regions"] == want["regions"] and meta["groups"] == want["groups"]
        for k, s in enumerate(sents):
            assert sum((r["tokens"] for r in meta["regions"] if r["span"][0] == k), []) == s["tokens"]
        assert all(r["box"] in boxes for r in meta["regions"])


def test_snippet_shards_feed_the_region_captioner_ingest(snippet_job):
    """The output is a valid shard set for caption.mode=region: region rows come out."""
    from dvsa.data.shards import iter_samples, load_vocab
    from dvsa.ingest.builder import BatchBuilder, IngestSpec

    vocab = load_vocab(str(snippet_job["out"]))
    spec = IngestSpec(layout="caption_region", image_size=32, rows=4, max_len=10, randomize=False)
    key, jpg, meta = next(iter_samples(str(snippet_job["out"]), "train"))
    batch = BatchBuilder(spec, vocab)({"__key__": [key], "jpg": [jpg], "json": [json.dumps(meta).encode()]})
    n = min(4, len(meta["regions"]))
    assert batch["box_mask"][0].sum() == n
    first = meta["regions"][0]["tokens"]
    assert vocab.decode(batch["targets"][0, 0].tolist()) == first[: 8]


def test_alignment_figure_png(snippet_job, tmp_path):
    from dvsa.inference.checkpoints import load_trained

    model, vocab, cfg = load_trained(str(snippet_job["ckpt"]))
    key, jpg, meta = first_sample(str(snippet_job["src"]), "val")
    p = alignment_figure(model, vocab, cfg, jpg, meta, tmp_path / "fig5.png")
    assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_job_refuses_a_captioner_checkpoint(tmp_path, snippet_job):
    from dvsa.data.shards import load_vocab
    from dvsa.errors import DvsaError
    from dvsa.models.build import build_model
    from dvsa.models.checkpoint import save_checkpoint

    cfg = _tiny_align_cfg(str(snippet_job["src"])).replace(task="caption")
    vocab = load_vocab(str(snippet_job["src"]))
    ckpt = save_checkpoint(tmp_path / "cap", model=build_model(cfg, vocab), step=0, epoch=0, vocab=vocab, cfg=cfg)
    with pytest.raises(DvsaError, match="alignment model"):
        write_snippet_shards(str(ckpt), str(snippet_job["src"]), str(tmp_path / "o"))
