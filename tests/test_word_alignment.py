"""Word-to-true-box accuracy: known assignments by hand, chance level by counting, and the
evaluation on a synth world logged to the alignment model's MLflow run."""

from __future__ import annotations

import json

import pytest
import torch

from dvsa.config import Config
from dvsa.experiments.word_alignment import (accuracy, chance_hit_rate, load_truth, match_sentences,
                                             true_boxes_in_frame, word_hits)




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


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory, synth_world):
    from dvsa.data.prepare import prepare_karpathy

    out = tmp_path_factory.mktemp("wa") / "karpathy"
    prepare_karpathy(str(synth_world / "karpathy" / "dataset_synth.json"), str(synth_world / "vg"), str(out),
                     proposals=str(synth_world / "karpathy" / "proposals.json"), min_count=1,
                     use_ray=False, progress=False)
    return out


def _checkpoint(tmp_path, shards):
    from dvsa.data.shards import load_vocab
    from dvsa.models.alignment import AlignmentModel
    from dvsa.train.checkpoints import save_checkpoint

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
    from dvsa.train.checkpoints import load_trained

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
    assert 0.0 <= res.acc_argmax <= 1.0 and 0.0 <= res.acc_mrf <= 1.0
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
    from dvsa.train.checkpoints import load_trained

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
