"""Retrieval R@K and median rank: hand examples, brute force, chunking, 1K folds."""

from __future__ import annotations

import statistics

import pytest
import torch

from dvsa.config import Config
from dvsa.evaluation.retrieval import (
    fold_metrics,
    matrix_score_fn,
    metrics_from_ranks,
    model_score_fn,
    retrieval_metrics,
    retrieval_ranks,
)
from dvsa.models.alignment import AlignmentModel


def _brute_force(S: torch.Tensor, sent_img: list[int]) -> dict[str, float]:
    """Sort-based ranks, one query at a time (no ties in random S)."""
    n_img, n_sent = S.shape
    i2t, t2i = [], []
    for k in range(n_img):
        order = sorted(range(n_sent), key=lambda l: -float(S[k, l]))
        i2t.append(min(order.index(l) for l in range(n_sent) if sent_img[l] == k))
    for l in range(n_sent):
        order = sorted(range(n_img), key=lambda k: -float(S[k, l]))
        t2i.append(order.index(sent_img[l]))
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for K in (1, 5, 10):
            out[f"{name}_r{K}"] = 100.0 * sum(r < K for r in ranks) / len(ranks)
        out[f"{name}_medr"] = float(statistics.median_low([r + 1 for r in ranks]))
    return out


def test_hand_example():
    # 3 images, 2 sentences each (sentence l belongs to image l // 2)
    S = torch.tensor([[9.0, 1.0, 8.0, 0.0, 0.0, 0.0],    # image 0: its sentence 0 is first
                      [5.0, 6.0, 7.0, 1.0, 0.0, 0.0],    # image 1: best own is s2 at rank 0
                      [9.5, 9.4, 9.3, 9.2, 1.0, 2.0]])   # image 2: its best (s5) is behind 4
    sent_img = torch.tensor([0, 0, 1, 1, 2, 2])
    i2t, t2i = retrieval_ranks(matrix_score_fn(S), 3, sent_img)
    assert i2t.tolist() == [0, 0, 4]
    # sentence columns: s0 -> image 0 has 9 < 9.5: rank 1; s1 -> 1.0 below 6, 9.4: rank 2;
    # s2 -> image 1 has 7 < 8, 9.3: rank 2; s3 -> 1.0 < 9.2: rank 1; s4 -> 1.0: rank 0; s5: 0
    assert t2i.tolist() == [1, 2, 2, 1, 0, 0]
    m = retrieval_metrics(S, sent_img)
    assert m["i2t_r1"] == pytest.approx(200 / 3) and m["i2t_r5"] == 100.0 and m["i2t_medr"] == 1.0
    assert m["t2i_r1"] == pytest.approx(200 / 6) and m["t2i_medr"] == 2.0
    assert set(m) == {f"{d}_{x}" for d in ("i2t", "t2i") for x in ("r1", "r5", "r10", "medr")}


def test_chunked_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    n_img = 23
    sent_img = torch.arange(n_img).repeat_interleave(5)[torch.randperm(5 * n_img, generator=g)]
    S = torch.randn(n_img, 5 * n_img, generator=g)
    S[sent_img, torch.arange(5 * n_img)] += 1.5          # better than chance, not perfect
    expected = _brute_force(S, sent_img.tolist())
    for img_chunk, sent_chunk in ((1000, 10000), (4, 7), (1, 1)):
        got = retrieval_metrics(S, sent_img, img_chunk=img_chunk, sent_chunk=sent_chunk)
        assert got == pytest.approx(expected)


def test_ties_count_against_the_query():
    S = torch.zeros(4, 8)
    i2t, t2i = retrieval_ranks(matrix_score_fn(S), 4, torch.arange(4).repeat_interleave(2))
    assert i2t.tolist() == [6] * 4 and t2i.tolist() == [3] * 8


def test_folds_average_the_per_fold_metrics():
    g = torch.Generator().manual_seed(1)
    n_img, fold = 30, 10
    sent_img = torch.arange(n_img).repeat_interleave(5)
    S = torch.randn(n_img, 5 * n_img, generator=g)
    S[sent_img, torch.arange(5 * n_img)] += 1.0
    per_fold = []
    for f in range(3):
        imgs, sents = slice(f * fold, (f + 1) * fold), slice(5 * f * fold, 5 * (f + 1) * fold)
        per_fold.append(_brute_force(S[imgs, sents], (sent_img[sents] - f * fold).tolist()))
    expected = {k: sum(p[k] for p in per_fold) / 3 for k in per_fold[0]}
    assert fold_metrics(S, sent_img, fold_size=fold, sent_chunk=13) == pytest.approx(expected)
    # fewer images than a fold: the one fold is the full set
    assert fold_metrics(S, sent_img, fold_size=1000) == pytest.approx(retrieval_metrics(S, sent_img))


def test_model_callback_equals_the_full_score_matrix():
    torch.manual_seed(0)
    cfg = Config().replace(**{"model.backbone": "tiny", "model.embed_dim": 8, "model.hidden_dim": 8,
                              "model.word_dim": 8})
    model = AlignmentModel(cfg.model, cfg.align, vocab_size=20, with_encoder=False)
    n_img = 12
    feats = torch.randn(n_img, 3, model.feat_dim)
    v_mask = torch.rand(n_img, 3) < 0.8
    v_mask[:, 0] = True
    tokens = torch.randint(4, 20, (5 * n_img, 6))
    lengths = torch.randint(1, 7, (5 * n_img,))
    sent_img = torch.arange(n_img).repeat_interleave(5)
    with torch.no_grad():
        v, v_mask = model.embed_region_features(feats, v_mask)
        s, s_mask = model.embed_words(tokens, lengths)
        S = model.scores(v, v_mask, s, s_mask)
    fn = model_score_fn(model, v, v_mask, s, s_mask)
    assert retrieval_metrics(fn, sent_img, n_img=n_img, img_chunk=5, sent_chunk=17) == \
        pytest.approx(retrieval_metrics(S, sent_img))


def test_bad_inputs():
    with pytest.raises(ValueError, match="image 1 has no sentence"):
        retrieval_metrics(torch.zeros(3, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"sent_img\[1\]=5"):
        retrieval_metrics(torch.zeros(3, 2), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="n_img is required"):
        retrieval_metrics(lambda a, b: None, torch.tensor([0]))


def test_metrics_from_ranks():
    m = metrics_from_ranks(torch.tensor([0, 4, 9, 10]), torch.tensor([2]))
    assert m["i2t_r1"] == 25.0 and m["i2t_r5"] == 50.0 and m["i2t_r10"] == 75.0 and m["i2t_medr"] == 5.0
    assert m["t2i_r1"] == 0.0 and m["t2i_medr"] == 3.0


# 4 images, one sentence each (sentence l is image l's); ranks worked out by hand below.
HAND_S = torch.tensor([[0.90, 0.10, 0.80, 0.95],
                       [0.50, 0.60, 0.70, 0.20],
                       [0.30, 0.20, 0.40, 0.10],
                       [0.99, 0.00, 0.50, 0.60]])
# full split: i2t ranks (0-based) 1 (0.95 > 0.9), 1 (0.7 > 0.6), 0, 1 (0.99 > 0.6);
#             t2i ranks 1 (0.99 > 0.9), 0, 3 (0.8, 0.7, 0.5 > 0.4), 1 (0.95 > 0.6)
HAND_FULL = {"i2t_r1": 25.0, "i2t_r5": 100.0, "i2t_r10": 100.0, "i2t_medr": 2.0,
             "t2i_r1": 25.0, "t2i_r5": 100.0, "t2i_r10": 100.0, "t2i_medr": 2.0}
# folds of 2 images (0-1, 2-3): i2t ranks 0 0 | 0 0; t2i ranks 0 0 | 1 (0.5 > 0.4) 0 -> t2i R@1 (100 + 50) / 2,
# Med r (1 + 1) / 2 (the lower middle of ranks 2, 1 is 1)
HAND_FOLDS = {"i2t_r1": 100.0, "i2t_r5": 100.0, "i2t_r10": 100.0, "i2t_medr": 1.0,
              "t2i_r1": 75.0, "t2i_r5": 100.0, "t2i_r10": 100.0, "t2i_medr": 1.0}


class _MatrixModel(torch.nn.Module):
    """Scores looked up in a fixed matrix: region 'embedding' = image index, word = sentence index."""

    def __init__(self, S: torch.Tensor):
        super().__init__()
        self.register_buffer("S", S)

    def scores(self, v, v_mask, s, s_mask):
        return self.S[v[:, 0, 0].long()][:, s[:, 0, 0].long()]


def test_full_split_and_fold_figures_of_a_hand_matrix():
    assert retrieval_metrics(HAND_S, torch.arange(4)) == pytest.approx(HAND_FULL)
    assert fold_metrics(HAND_S, torch.arange(4), fold_size=2) == pytest.approx(HAND_FOLDS)


def test_evaluation_reports_folds_only_for_a_split_of_at_least_one_fold():
    from dvsa.evaluation.alignment_eval import protocol_lines, retrieval_from_embeddings, retrieval_table

    model = _MatrixModel(HAND_S)
    m = retrieval_from_embeddings(model, _hand_split_of(4), fold_size=2)
    assert {k[len("retrieval/"):]: v for k, v in m.items() if k.startswith("retrieval/") and
            k[len("retrieval/"):] in HAND_FULL} == pytest.approx(HAND_FULL)
    assert {k[len("retrieval_2/"):]: v for k, v in m.items() if k.startswith("retrieval_2/") and
            k[len("retrieval_2/"):] in HAND_FOLDS} == pytest.approx(HAND_FOLDS)
    assert m["retrieval_2/folds"] == 2 and m["retrieval/images"] == 4 and m["retrieval/sentences"] == 4
    assert m["retrieval/rsum"] == pytest.approx(25 + 100 + 100 + 25 + 100 + 100)
    table = retrieval_table(m, fold_size=2)
    assert "| full split (4 images) | 25.0 | 100.0 | 100.0 | 2 | 25.0 | 100.0 | 100.0 | 2 |" in table
    assert "| 2-image folds (mean of 2) | 100.0 | 100.0 | 100.0 | 1 | 75.0 | 100.0 | 100.0 | 1 |" in table
    assert "retrieval_2/*: the mean over 2 fold(s) of 2 consecutive images" in table

    # the paper's 1K folds: a 4-image split has none, and says the full split is all there is
    m = retrieval_from_embeddings(model, _hand_split_of(4))
    assert not any(k.startswith("retrieval_1k/") for k in m)
    lines = protocol_lines(m)
    assert lines[0] == "retrieval/*: the full split, each of 4 images against all 4 sentences and back"
    assert lines[1].startswith("retrieval_1k/*: none: the split has 4 images, fewer than 1,000")
    # 3 images in folds of 2: one fold, the last image in none
    m = retrieval_from_embeddings(_MatrixModel(HAND_S[:3, :3]), _hand_split_of(3), fold_size=2)
    assert m["retrieval_2/folds"] == 1
    assert protocol_lines(m, 2)[1].endswith("; the last 1 image(s) are in no fold")


def _hand_split_of(n: int):
    from dvsa.evaluation.alignment_eval import EmbeddedSplit

    idx = torch.arange(n, dtype=torch.float)[:, None, None]
    return EmbeddedSplit(idx, torch.ones(n, 1, dtype=torch.bool), idx.clone(), torch.ones(n, 1, dtype=torch.bool),
                         torch.arange(n))
