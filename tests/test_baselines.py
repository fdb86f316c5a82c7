"""Table 4 (ranking baseline, BLEU rows) and Table 1's ablation bookkeeping, on toy cases
with known answers."""

from __future__ import annotations

import io

import pytest
import torch

from dvsa.config import Config
from dvsa.experiments.baselines import (
    format_markdown,
    nn_baseline_predictions,
    rank_snippets,
    score_predictions_local,
    snippet_candidates,
    table4_rows,
)


def test_rank_snippets_mean_vs_sum_and_chunks():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = torch.tensor([[[1.0, 0.0], [0.0, 0.0]],     # c0 "red":        region 0 -> 1
                      [[1.0, 0.0], [1.0, 0.0]],     # c1 "red red":    region 0 -> 2 (sum), 1 (mean)
                      [[0.0, 3.0], [9.0, 9.0]]])    # c2 "blue" (+ a padded position that must not count)
    mask = torch.tensor([[True, False], [True, True], [True, False]])
    for chunk in (1, 2, 4096):
        best, score = rank_snippets(v, s, mask, per_word=True, chunk=chunk)
        assert best.tolist() == [0, 2, 2]            # region 0: c0 and c1 tie at 1.0 -> the first
        assert score.tolist() == [1.0, 3.0, 3.0]
        best, score = rank_snippets(v, s, mask, per_word=False, chunk=chunk)
        assert best.tolist() == [1, 2, 2] and score.tolist() == [2.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="no candidate"):
        rank_snippets(v, s[:0], mask[:0])


def _jpeg(colour) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def toy_region_shards(tmp_path):
    from dvsa.data.shards import ShardWriter

    root = tmp_path / "regions"
    samples = [
        ("1", _jpeg((200, 0, 0)), {"image_id": 1, "split": "test", "width": 40, "height": 30, "regions": [],
                                  "groups": [{"box": [0, 0, 20, 20], "region_ids": [1, 2],
                                              "refs": ["red circle", "a red circle"]},
                                             {"box": [20, 5, 40, 30], "region_ids": [3], "refs": ["blue square"]}]}),
        ("2", _jpeg((0, 0, 200)), {"image_id": 2, "split": "test", "width": 40, "height": 30, "regions": [],
                                  "groups": [{"box": [5, 5, 30, 25], "region_ids": [4], "refs": ["blue square"]},
                                             # no usable reference
                                             {"box": [1, 1, 2, 2], "region_ids": [5], "refs": [""]}]}),
        ("3", _jpeg((0, 200, 0)), {"image_id": 3, "split": "train", "width": 40, "height": 30, "groups": [],
                                  "regions": [{"id": 1, "box": [0, 0, 9, 9], "raw": "blue square",
                                               "tokens": ["blue", "square"]},
                                              {"id": 2, "box": [0, 0, 9, 9], "raw": "red", "tokens": ["red"]},
                                              {"id": 3, "box": [0, 0, 9, 9], "raw": "red circle",
                                               "tokens": ["red", "circle"]},
                                              {"id": 4, "box": [0, 0, 9, 9], "raw": "red", "tokens": ["red"]}]}),
    ]
    for split in ("test", "train"):
        with ShardWriter(str(root), split, 1 << 20) as w:
            for key, jpg, meta in samples:
                if meta["split"] == split:
                    w.write(key, jpg, meta)
    return root


def _constant_region_model(vocab_size: int):
    """v = b_m whatever the image (W_m = 0); s_t = one-hot of word t (bag of words, identity
    layers): score(region, snippet) = mean over its words of b_m[word]."""
    from dvsa.models.alignment import AlignmentModel

    cfg = Config().replace(**{"task": "align", "model.backbone": "tiny", "model.roi_size": 2, "data.image_size": 32,
                              "model.word_dim": 4, "model.hidden_dim": 4, "model.embed_dim": 4,
                              "align.sentence_encoder": "bow"})
    model = AlignmentModel(cfg.model, cfg.align, vocab_size).eval()
    with torch.no_grad():
        model.W_m.weight.zero_()
        model.W_m.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))   # likes "blue" and "square"
        enc = model.sentence
        enc.W_w.weight.zero_()
        enc.W_w.weight[4:8] = torch.eye(4)
        for lin in (enc.W_e, enc.W_d):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
    return model, cfg


def test_nn_baseline_retrieves_the_most_compatible_training_snippet(toy_region_shards):
    from dvsa.text import Vocab

    cands = snippet_candidates(str(toy_region_shards), "train")
    # unique captions, most frequent first, ties in order of appearance
    assert cands == [("red",), ("blue", "square"), ("red", "circle")]
    vocab = Vocab(["<pad>", "<start>", "<end>", "<unk>", "red", "circle", "blue", "square"],
                  [0, 4, 4, 0, 3, 1, 1, 1], 1, 4)
    model, cfg = _constant_region_model(len(vocab))
    preds, skipped = nn_baseline_predictions(model, vocab, cfg, cands, str(toy_region_shards), "test")
    assert skipped == {}
    # three queries (image 2's second group has no usable reference); every region gets
    # "blue square" (mean score 1.0 against 0.0 for the others)
    assert [(p["qid"], p["caption"], p["refs"]) for p in preds] == [
        ("1:0", "blue square", ["red circle", "a red circle"]),
        ("1:1", "blue square", ["blue square"]),
        ("2:0", "blue square", ["blue square"]),
    ]
    assert all(p["score"] == pytest.approx(1.0) for p in preds)
    capped, _ = nn_baseline_predictions(model, vocab, cfg, cands, str(toy_region_shards), "test", max_queries=2)
    assert [p["qid"] for p in capped] == ["1:0", "1:1"]


def test_scores_and_table_rows():
    preds = [{"qid": "a", "caption": "a large red circle on the left", "refs": ["a large red circle on the left"]},
             {"qid": "b", "caption": "a small blue square at the top", "refs": ["a small blue square at the top"]}]
    scores = score_predictions_local(preds, metrics="bleu", tokenizer="none")   # BLEU only: no JVM
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    rows = table4_rows({"exact": scores, "prefixed": {"region/Bleu_1": 0.2291, "region/Bleu_4": 0.0}})
    assert rows[0]["Bleu_1"] == 100.0 and rows[0]["Bleu_4"] == 100.0
    assert rows[1] == {"model": "prefixed", "Bleu_1": 22.9, "Bleu_4": 0.0}
    md = format_markdown(rows).splitlines()
    assert md[0].startswith("| model | B-1 | B-2 | B-3 | B-4 |") and md[3].startswith("| prefixed | 22.9 |")


# --------------------------------------------------------------------------- Table 1 ablations


def test_ablation_table_bookkeeping_with_a_recording_train_fn(tmp_path):
    """Table 1's bookkeeping without training: each variant's config reaches train_fn, its run
    is tagged, and the table reads the runs back (test-set figures over validation ones)."""
    from dvsa import tracking
    from dvsa.experiments.ablations import collect_ablation_table, run_ablations
    from dvsa.experiments.ablations import format_markdown as t1_markdown
    from dvsa.train.launch import TrainOutcome

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seen = []

    def record_train(cfg, task):
        """What train() leaves behind for this test: the run, with the variant's figures."""
        seen.append((task, cfg.align.sentence_encoder, cfg.align.score, cfg.mlflow.run_name, cfg.train.name))
        logger, _ = tracking.start_run(uri, cfg.mlflow.experiment, cfg.mlflow.run_name, {"task": task})
        r1 = {"brnn": 50.0, "bow": 30.0}[cfg.align.sentence_encoder] - (5.0 if cfg.align.score == "eq7" else 0.0)
        logger.log_metrics({"best/val/i2t_r1": r1, "best/val/t2i_medr": 3.0}, step=1)
        logger.end()
        return TrainOutcome(name=cfg.train.name, run_dir="", run_id=logger.run_id, tracking_uri=uri,
                            checkpoint=None, latest_checkpoint=None, step=1, epoch=1)

    cfg = Config().replace(**{"name": "abl", "mlflow.experiment": "t1"})
    rows = run_ablations(cfg, train_fn=record_train)
    assert [s[:3] for s in seen] == [("align", "brnn", "eq8"), ("align", "bow", "eq8"), ("align", "brnn", "eq7")]
    assert len({s[4] for s in seen}) == 3           # each variant its own Ray Train name
    assert [(r["variant"], r["i2t_r1"], r["t2i_medr"], r["source"]) for r in rows] == [
        ("brnn_eq8", 50.0, 3.0, "best/val"), ("bow_eq8", 30.0, 3.0, "best/val"), ("brnn_eq7", 45.0, 3.0, "best/val")]
    # a test-set evaluation on a run takes precedence over the validation figures
    tracking.RunLogger(uri, rows[0]["run_id"]).log_metrics({"retrieval/i2t_r1": 48.0}, step=0)
    again = collect_ablation_table(uri, "t1")
    assert (again[0]["source"], again[0]["i2t_r1"]) == ("retrieval", 48.0)
    assert "| BRNN, eq. 8 (ours) | 48.0 |" in t1_markdown(again)


def test_ablations_over_seeds_aggregate_median_and_range(tmp_path):
    """Any variant (settings), several seeds: every (variant, seed) trains once with its seed, the
    evaluation lands in its run, and the table's row is the median with the range."""
    from dvsa import tracking
    from dvsa.experiments.ablations import collect_ablation_table, format_markdown, run_ablations
    from dvsa.train.launch import TrainOutcome

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seen = []

    def record_train(cfg, task):
        seen.append((cfg.train.seed, cfg.align.loss, cfg.train.name))
        logger, _ = tracking.start_run(uri, cfg.mlflow.experiment, cfg.mlflow.run_name, {"task": task})
        logger.log_params(cfg.flat())
        logger.end()
        return TrainOutcome(name=cfg.train.name, run_dir="", run_id=logger.run_id, tracking_uri=uri,
                            checkpoint=None, latest_checkpoint=None, step=cfg.train.seed, epoch=1)

    def evaluate(outcome):          # seed s scores 80 + 5 s (sum) or 90 - s (hardest)
        loss = "hardest" if "hard" in outcome.name else "sum"
        return {"retrieval/i2t_r1": 90.0 - outcome.step if loss == "hardest" else 80.0 + 5 * outcome.step,
                "retrieval/t2i_medr": 1.0}

    cfg = Config().replace(**{"name": "abl", "mlflow.experiment": "seeds"})
    settings = {"base": {}, "hard": {"align.loss": "hardest"}}
    rows = run_ablations(cfg, ["base", "hard"], "g", record_train, settings=settings, seeds=[0, 1, 2],
                         evaluate_fn=evaluate)
    assert [s[:2] for s in seen] == [(0, "sum"), (1, "sum"), (2, "sum"), (0, "hardest"), (1, "hardest"),
                                     (2, "hardest")]
    assert seen[0][2] == "abl-g-base-s0" and len({s[2] for s in seen}) == 6
    assert [(r["variant"], r["runs"], r["seeds"], r["source"], r["i2t_r1"], r["range"]["i2t_r1"]) for r in rows] == [
        ("base", 3, ["0", "1", "2"], "retrieval", 85.0, (80.0, 90.0)),
        ("hard", 3, ["0", "1", "2"], "retrieval", 89.0, (88.0, 90.0))]
    assert collect_ablation_table(uri, "seeds", "g", order=["hard", "base"])[0]["variant"] == "hard"
    md = format_markdown(rows).splitlines()
    assert md[2].startswith("| base | 85.0 (80.0-90.0) |  |  |  | ") and md[2].endswith("| 1 | 3 | retrieval |")


@pytest.mark.slow
@pytest.mark.ray
def test_ablations_train_each_variant_with_its_setting(ray_local, shards, tmp_path):
    """One real epoch of the train-align job per variant (tiny config): every variant gets its
    own MLflow run, tagged, with its sentence encoder and score as params, its validation
    retrieval metrics, and a checkpoint whose model is built that way; Table 1 reads the runs'
    best validation figures back."""
    from eval_fixtures import tiny_cfg

    from dvsa import tracking
    from dvsa.experiments.ablations import METRICS, VARIANTS, run_ablations
    from dvsa.inference.checkpoints import load_trained

    cfg = tiny_cfg(shards, tmp_path, "name=abl", "train.epochs=1", "data.max_val_images=4",
                   "mlflow.experiment=t1-real")
    rows = run_ablations(cfg)
    assert [r["variant"] for r in rows] == list(VARIANTS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    assert len({r["run_id"] for r in rows}) == 3
    for row in rows:
        variant, setting = row["variant"], VARIANTS[row["variant"]]
        run = c.get_run(row["run_id"])
        assert run.info.status == "FINISHED" and run.info.run_name == f"table1-{variant}"
        assert run.data.tags["dvsa.ablation"] == variant and run.data.tags["dvsa.ablation_group"] == "table1"
        assert run.data.tags["task"] == "align"
        assert run.data.params["align.sentence_encoder"] == setting["align.sentence_encoder"]
        assert run.data.params["align.score"] == setting["align.score"]
        assert run.data.params["train.name"] == f"abl-table1-{variant}"
        # the validation pass ran on the capped 4 images (of 6) and the table shows its best figures
        assert run.data.metrics["best/val/images"] == 4.0
        assert row["source"] == "best/val"
        for m in METRICS:
            assert row[m] == run.data.metrics[f"best/val/{m}"], (variant, m)
        # the checkpoint holds a model built with the variant's setting
        model, _, ckpt_cfg = load_trained(run.data.tags[tracking.CHECKPOINT_TAG])
        assert ckpt_cfg.align.sentence_encoder == setting["align.sentence_encoder"]
        assert ckpt_cfg.align.score == setting["align.score"]
        assert model.sentence.kind == setting["align.sentence_encoder"]
        assert hasattr(model.sentence, "W_f") == (setting["align.sentence_encoder"] == "brnn")
        # one region and one word per side, v^T s = -1: eq. 8 keeps it (sum_t max_i), eq. 7
        # clips it (sum_t sum_i max(0, .))
        v = torch.zeros(2, 1, cfg.model.embed_dim)
        v[:, 0, 0] = -1.0
        s = torch.zeros(2, 1, cfg.model.embed_dim)
        s[:, 0, 0] = 1.0
        ones = torch.ones(2, 1, dtype=torch.bool)
        want = -1.0 if setting["align.score"] == "eq8" else 0.0
        assert model.scores(v, ones, s, ones).tolist() == [[want, want], [want, want]]
