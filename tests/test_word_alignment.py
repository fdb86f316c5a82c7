"""Word-to-true-box accuracy: known assignments by hand, exact accuracies (argmax, MRF, no
evidence, per role, chance) of a hand-set aligner on a hand-made world, counts and chance on a
synth world, and the evaluation logged to the alignment model's MLflow run."""

from __future__ import annotations

import json

import pytest
import torch

from dvsa.config import Config
from dvsa.experiments.word_alignment import (
    accuracy,
    chance_hit_rate,
    load_truth,
    match_sentences,
    true_boxes_in_frame,
    word_hits,
)

FULL = [0, 0, 100, 100]
BIG = [0, 0, 80, 80]          # IoU with the whole image = 0.64
SMALL = [85, 85, 100, 100]    # IoU with the whole image = 0.0225
BOXES = [FULL, [1, 1, 79, 81], [84, 86, 100, 100]]   # whole image + jittered proposals
OBJECTS = [-1, 0, 0, -1, 1, 1, 0, 1, 1]               # "a big red and small blue ..." (7 object words)


def test_perfect_assignment_scores_one():
    perfect = [0, 1, 1, 0, 2, 2, 1, 2, 2]
    hits = word_hits(perfect, BOXES, OBJECTS, [BIG, SMALL])
    assert [t for t, _ in hits] == [1, 2, 4, 5, 6, 7, 8]
    assert accuracy([ok for _, ok in hits]) == 1.0


def test_everything_on_the_whole_image_scores_the_big_objects_share():
    hits = word_hits([0] * 9, BOXES, OBJECTS, [BIG, SMALL])
    # the whole image matches the big object (IoU 0.64) but not the small one: 3 of 7 words
    assert accuracy([ok for _, ok in hits]) == pytest.approx(3 / 7)
    swapped = word_hits([0, 2, 2, 0, 1, 1, 2, 1, 1], BOXES, OBJECTS, [BIG, SMALL])
    assert accuracy([ok for _, ok in swapped]) == 0.0


def test_chance_is_the_share_of_matching_boxes():
    assert chance_hit_rate(BOXES, BIG) == pytest.approx(2 / 3)       # whole image and proposal 1
    assert chance_hit_rate(BOXES, SMALL) == pytest.approx(1 / 3)
    assert chance_hit_rate(BOXES[1:], SMALL) == pytest.approx(1 / 2)
    assert chance_hit_rate([], SMALL) == 0.0


def test_truth_frame_and_sentence_matching():
    t = {"width": 200, "height": 100, "objects": [{"box": [20, 10, 60, 50]}]}
    assert true_boxes_in_frame(t, 100, 50) == [[10, 5, 30, 25]]
    truth = [{"tokens": ["a", "b"], "id": 1}, {"tokens": ["c"], "id": 2}, {"tokens": ["a", "b"], "id": 3}]
    got = match_sentences([{"tokens": ["a", "b"]}, {"tokens": ["x"]}, {"tokens": ["a", "b"]}], truth)
    assert [g and g["id"] for g in got] == [1, None, 3]


# --------------------------------------------------------------------------- a hand-made world
# Three 96 x 96 test images on a gray background, a hand-set aligner (eval_fixtures.colour_aligner:
# feature 0 of a box = its mean redness, feature 1 its blueness) whose words are set by hand:
# "red", "circle" -> 3 e_0; "blue", "square" -> 3 e_1; "large" -> 0.1 e_1 (a weak, wrong pull
# towards blue boxes); every other word 0 (no evidence: its scores tie over the boxes).
#
# image 1 (truth recorded at 192 x 192: the truth boxes are scaled by 1/2 into the stored frame)
#   red circle [8,8,40,40], blue square [56,56,88,88]; proposals = those two boxes.
#   "a large red circle":          argmax: large -> blue box (wrong), red, circle right;
#                                  MRF (beta 0.5): every word on the red box (3 of 3 right)
#   "blue square and red circle":  both alignments right on all 4 object words
# image 2: one red circle [8,8,88,88], proposals [8,8,88,88], [4,4,84,84]: every box (whole
#   image IoU 0.69) matches it, so "big red circle" is right whatever box a word takes;
#   "big" carries no evidence (the one no-evidence word of the set).
# image 3: red circle [56,8,88,40] without a proposal, blue square [8,56,40,88] with one.
#   "red circle": the whole image is the reddest candidate -> wrong in both alignments;
#   "the blue square": right in both.
# Object words: 14. argmax right: 2+4+3+0+2 = 11; MRF right: 3+4+3+0+2 = 12; no evidence: 1.
# Chance (uniform over whole image + proposals): image 1 objects 1/3 each (7 words), image 2
# 1 (3 words), image 3 red 0/2, blue 1/2 (2 words each): (7/3 + 3 + 0 + 1) / 14 = 19/42.
# Over the proposals only: (7 * 1/2 + 3 + 0 + 2 * 1) / 14 = 17/28.

_GRAY, _RED, _BLUE = (128, 128, 128), (230, 20, 20), (20, 20, 230)
_WORDS = ["a", "large", "red", "circle", "blue", "square", "and", "big", "the"]


def _jpeg(objects) -> bytes:
    import io

    from PIL import Image, ImageDraw

    im = Image.new("RGB", (96, 96), _GRAY)
    draw = ImageDraw.Draw(im)
    for (x1, y1, x2, y2), colour in objects:
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _sentence(text: str, objects: list[int], roles: list[str]) -> dict:
    return {"tokens": text.split(), "objects": objects, "roles": roles}


@pytest.fixture(scope="module")
def hand_world(tmp_path_factory):
    """(shard dir, truth dict) of the hand-made world described above."""
    from dvsa.data.shards import ShardWriter

    red1, blue1 = [8, 8, 40, 40], [56, 56, 88, 88]
    red2 = [8, 8, 88, 88]
    red3, blue3 = [56, 8, 88, 40], [8, 56, 40, 88]
    truth = {
        1: {"image_id": 1, "split": "test", "width": 192, "height": 192,
            "objects": [{"box": [2 * v for v in red1]}, {"box": [2 * v for v in blue1]}],
            "sentences": [_sentence("a large red circle", [-1, 0, 0, 0], ["other", "size", "colour", "shape"]),
                          _sentence("blue square and red circle", [1, 1, -1, 0, 0],
                                    ["colour", "shape", "other", "colour", "shape"]),
                          _sentence("a red square", [-1, 0, 0], ["other", "colour", "shape"])]},  # not in the shard
        2: {"image_id": 2, "split": "test", "width": 96, "height": 96, "objects": [{"box": red2}],
            "sentences": [_sentence("big red circle", [0, 0, 0], ["size", "colour", "shape"])]},
        3: {"image_id": 3, "split": "test", "width": 96, "height": 96,
            "objects": [{"box": red3}, {"box": blue3}],
            "sentences": [_sentence("red circle", [0, 0], ["colour", "shape"]),
                          _sentence("the blue square", [-1, 1, 1], ["other", "colour", "shape"])]},
    }
    samples = [
        (1, _jpeg([(red1, _RED), (blue1, _BLUE)]), [red1, blue1],
         ["a large red circle", "blue square and red circle", "a blue circle"]),   # the last: not in truth
        (2, _jpeg([(red2, _RED)]), [red2, [4, 4, 84, 84]], ["big red circle"]),
        (3, _jpeg([(red3, _RED), (blue3, _BLUE)]), [blue3], ["red circle", "the blue square"]),
        (9, _jpeg([(red1, _RED)]), [red1], ["red circle"]),                        # no truth entry
    ]
    root = tmp_path_factory.mktemp("hand_world")
    with ShardWriter(str(root), "test", 1 << 20) as w:
        for image_id, jpg, proposals, sentences in samples:
            w.write(f"{image_id:04d}", jpg, {
                "image_id": image_id, "split": "test", "width": 96, "height": 96, "proposals": proposals,
                "sentences": [{"raw": s, "tokens": s.split()} for s in sentences]})
    return root, truth


def _hand_aligner(beta: float = 0.5):
    from eval_fixtures import colour_aligner

    from dvsa.text import Vocab

    vocab = Vocab(["<pad>", "<start>", "<end>", "<unk>"] + _WORDS, [0, 5, 5, 0] + [1] * len(_WORDS), 1, 5)
    cfg = Config().replace(**{"task": "align", "model.backbone": "tiny", "model.roi_size": 2,
                              "data.image_size": 64, "data.max_regions": 4, "model.embed_dim": 4,
                              "model.word_dim": 4, "model.hidden_dim": 4, "align.mrf_beta": beta})
    model = colour_aligner(cfg, vocab)
    W = model.sentence.W_w.weight
    with torch.no_grad():
        W.zero_()
        for word, dim, value in (("red", 0, 3.0), ("circle", 0, 3.0), ("blue", 1, 3.0), ("square", 1, 3.0),
                                 ("large", 1, 0.1)):
            W[vocab.stoi[word], dim] = value
    return model, vocab, cfg


def test_hand_set_aligner_exact_accuracies_on_a_hand_made_world(hand_world):
    from dvsa.experiments.word_alignment import word_alignment_accuracy

    shards, truth = hand_world
    model, vocab, cfg = _hand_aligner()
    res = word_alignment_accuracy(model, vocab, cfg, str(shards), truth, "test", batch_size=2)
    assert (res.images, res.sentences, res.words) == (3, 5, 14)
    assert res.skipped == {"image_not_in_truth": 1, "sentence_not_in_truth": 1}
    assert res.beta == 0.5
    assert res.acc_argmax == pytest.approx(11 / 14)
    assert res.acc_mrf == pytest.approx(12 / 14)
    assert res.no_evidence == pytest.approx(1 / 14)
    assert res.chance == pytest.approx(19 / 42)
    assert res.chance_proposals == pytest.approx(17 / 28)
    assert res.by_role == {
        "colour": {"argmax": pytest.approx(5 / 6), "mrf": pytest.approx(5 / 6), "no_evidence": 0.0, "words": 6},
        "shape": {"argmax": pytest.approx(5 / 6), "mrf": pytest.approx(5 / 6), "no_evidence": 0.0, "words": 6},
        "size": {"argmax": 0.5, "mrf": 1.0, "no_evidence": 0.5, "words": 2},
    }
    m = res.metrics()
    assert m["align/word_acc_mrf"] == pytest.approx(12 / 14) and m["align/word_acc_words"] == 14.0
    assert m["align/word_acc_mrf_size"] == 1.0 and m["align/word_no_evidence_size"] == 0.5
    # beta = 0: the MRF alignment is the argmax one; the batch size changes nothing
    res0 = word_alignment_accuracy(model, vocab, cfg, str(shards), truth, "test", beta=0.0, batch_size=16)
    assert res0.acc_mrf == res0.acc_argmax == pytest.approx(11 / 14) and res0.beta == 0.0
    # the first image only (max_images counts shard samples)
    res1 = word_alignment_accuracy(model, vocab, cfg, str(shards), truth, "test", max_images=1)
    assert (res1.images, res1.words, res1.acc_argmax, res1.acc_mrf) == (1, 7, pytest.approx(6 / 7), 1.0)


def test_hand_set_aligner_without_the_whole_image(hand_world):
    """align.whole_image=false: the candidates are the proposals only. Image 3's "red circle"
    then goes to the blue square's box (still wrong) and image 1's "large" still to the blue
    box under argmax; chance is the proposals-only chance."""
    from dvsa.experiments.word_alignment import word_alignment_accuracy

    shards, truth = hand_world
    model, vocab, cfg = _hand_aligner()
    cfg = cfg.replace(**{"align.whole_image": False})
    res = word_alignment_accuracy(model, vocab, cfg, str(shards), truth, "test")
    assert (res.words, res.acc_argmax, res.acc_mrf) == (14, pytest.approx(11 / 14), pytest.approx(12 / 14))
    assert res.chance == res.chance_proposals == pytest.approx(17 / 28)


def test_no_truth_match_is_a_one_line_error(hand_world):
    from dvsa.errors import DataError
    from dvsa.experiments.word_alignment import word_alignment_accuracy

    shards, truth = hand_world
    model, vocab, cfg = _hand_aligner()
    with pytest.raises(DataError, match=r"no test sentence with object words matched 1 truth images"):
        word_alignment_accuracy(model, vocab, cfg, str(shards), {5: truth[1] | {"image_id": 5}}, "test")


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory, synth_world):
    from dvsa.data.prepare import KarpathySource, PrepareOptions, prepare_karpathy

    out = tmp_path_factory.mktemp("wa") / "karpathy"
    prepare_karpathy(KarpathySource(str(synth_world / "karpathy" / "dataset_synth.json"), str(synth_world / "vg"),
                                    proposals=str(synth_world / "karpathy" / "proposals.json"), min_count=1),
                     str(out), PrepareOptions(use_ray=False, progress=False))
    return out


def _checkpoint(tmp_path, shards):
    from dvsa.data.shards import load_vocab
    from dvsa.models.alignment import AlignmentModel
    from dvsa.models.checkpoint import save_checkpoint

    cfg = Config().replace(**{
        "task": "align", "out": str(tmp_path), "data.fullframe_shards": str(shards), "data.image_size": 32,
        "data.max_regions": 6, "model.backbone": "tiny", "model.roi_size": 2, "model.embed_dim": 16,
        "model.word_dim": 8, "model.hidden_dim": 16, "align.mrf_beta": 2.0, "mlflow.experiment": "wa"})
    vocab = load_vocab(str(shards))
    torch.manual_seed(0)
    model = AlignmentModel(cfg.model, cfg.align, len(vocab))
    return save_checkpoint(tmp_path / "ckpt", model=model, step=0, epoch=0, vocab=vocab, cfg=cfg)


def test_synth_world_accuracy_counts_and_chance(tmp_path, synth_world, world_shards):
    from dvsa.experiments.word_alignment import word_alignment_accuracy
    from dvsa.inference.checkpoints import load_trained

    model, vocab, cfg = load_trained(str(_checkpoint(tmp_path, world_shards)))
    truth = load_truth(synth_world)
    res = word_alignment_accuracy(model, vocab, cfg, str(world_shards), truth, "test", batch_size=4)
    # independently: every object word of every test sentence, and the boxes the model sees
    props = json.loads((synth_world / "karpathy" / "proposals.json").read_text())
    words, chance = 0, []
    test = [t for t in truth.values() if t["split"] == "test"]
    for t in test:
        boxes = [[0, 0, t["width"], t["height"]]] + props[str(t["image_id"])]
        for s in t["sentences"]:
            for o in s["objects"]:
                if o >= 0:
                    words += 1
                    chance.append(chance_hit_rate(boxes, t["objects"][o]["box"]))
    assert res.images == len(test) and res.words == words and res.skipped == {}
    assert res.sentences == sum(len(t["sentences"]) for t in test)
    assert res.chance == pytest.approx(sum(chance) / len(chance))
    assert {"colour", "shape"} <= set(res.by_role) <= {"colour", "shape", "size", "position"}
    assert sum(r["words"] for r in res.by_role.values()) == words
    # beta = 0 is the argmax alignment
    res0 = word_alignment_accuracy(model, vocab, cfg, str(world_shards), truth, "test", beta=0.0)
    assert res0.acc_mrf == pytest.approx(res.acc_argmax)


def test_evaluate_logs_to_the_alignment_run(tmp_path, synth_world, world_shards, monkeypatch):
    from dvsa import tracking
    from dvsa.experiments.word_alignment import evaluate_word_alignment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpt = _checkpoint(tmp_path, world_shards)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger, _ = tracking.start_run(uri, "wa", "align-run", {"task": "align", tracking.CHECKPOINT_TAG: str(ckpt)})
    logger.end()
    got = evaluate_word_alignment(str(ckpt), str(synth_world), str(world_shards), out_dir=str(tmp_path / "o"),
                                  tracking_uri=uri)
    assert got["run_id"] == logger.run_id
    run = tracking.client(uri).get_run(logger.run_id)
    res = got["result"]
    assert run.data.metrics["align/word_acc_mrf"] == pytest.approx(res.acc_mrf)
    assert run.data.metrics["align/word_acc_argmax"] == pytest.approx(res.acc_argmax)
    assert run.data.metrics["align/word_acc_chance"] == pytest.approx(res.chance)
    arts = [a.path for a in tracking.client(uri).list_artifacts(logger.run_id, "figures")]
    assert arts == ["figures/fig5_alignment.png"]
    assert (tmp_path / "o" / "word_alignment.json").is_file()


def test_no_evidence_marks_words_whose_scores_tie_over_the_usable_boxes():
    from dvsa.experiments.word_alignment import no_evidence

    unary = torch.tensor([[0.0, 0.0, 0.0, 5.0],      # ties over the 3 usable boxes (box 3 is padding)
                          [1.0, 2.0, 1.0, 1.0],      # prefers box 1
                          [3.0, 3.0, 3.0, -9.0],     # a tie at a non-zero score
                          [1e4, 1e4 + 0.5, 1e4, 0]])  # a real preference on a larger scale
    mask = torch.tensor([True, True, True, False])
    assert no_evidence(unary, mask).tolist() == [True, False, True, False]


def test_dead_words_are_counted_as_carrying_no_evidence(tmp_path, synth_world, world_shards):
    """A sentence encoder whose eq. 6 output is ReLU-dead for every word: s_t = 0, every score
    ties, and the evaluation says so (overall and per role) instead of crediting a tie-break."""
    from dvsa.experiments.word_alignment import word_alignment_accuracy
    from dvsa.inference.checkpoints import load_trained

    model, vocab, cfg = load_trained(str(_checkpoint(tmp_path, world_shards)))
    truth = load_truth(synth_world)
    alive = word_alignment_accuracy(model, vocab, cfg, str(world_shards), truth, "test")
    assert alive.no_evidence < 0.5
    with torch.no_grad():
        model.sentence.W_d.weight.zero_()
        model.sentence.W_d.bias.fill_(-1.0)          # f(W_d(...) + b_d) = ReLU(-1) = 0
    dead = word_alignment_accuracy(model, vocab, cfg, str(world_shards), truth, "test")
    assert dead.no_evidence == 1.0
    assert all(r["no_evidence"] == 1.0 for r in dead.by_role.values())
    assert dead.metrics()["align/word_no_evidence"] == 1.0
