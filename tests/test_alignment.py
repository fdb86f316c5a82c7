"""Alignment model: BRNN (eq. 2-6), bag of words, scores (eq. 7, 8), ranking loss (eq. 9)."""

from __future__ import annotations

import pytest
import torch

from dvsa.config import Config
from dvsa.errors import DataError
from dvsa.models.alignment import AlignmentModel, ranking_loss, score_eq7, score_eq8


def _cfg(**kw):
    base = {"model.backbone": "tiny", "model.embed_dim": 6, "model.hidden_dim": 5, "model.word_dim": 4}
    base.update(kw)
    return Config().replace(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _brnn_by_hand(enc, words: list[int], drop=lambda x: x) -> torch.Tensor:
    """Eq. 2-6 word by word for one unpadded sentence; ``drop`` where dropout acts (on the
    word vectors and before W_d, never on the recurrence)."""
    relu = torch.relu
    x = [drop(enc.W_w.weight[w]) for w in words]                                # eq. 2
    e = [relu(enc.W_e.weight @ xt + enc.W_e.bias) for xt in x]                   # eq. 3
    n, H = len(words), enc.W_e.out_features
    hf, h = [], torch.zeros(H)
    for t in range(n):                                                          # eq. 4
        h = relu(e[t] + enc.W_f.weight @ h + enc.W_f.bias)
        hf.append(h)
    hb, h = [None] * n, torch.zeros(H)
    for t in reversed(range(n)):                                                # eq. 5
        h = relu(e[t] + enc.W_b.weight @ h + enc.W_b.bias)
        hb[t] = h
    return torch.stack([relu(enc.W_d.weight @ drop(hf[t] + hb[t]) + enc.W_d.bias) for t in range(n)])  # eq. 6


def test_brnn_dropout_is_on_words_and_output_never_on_the_recurrence():
    cfg = _cfg(**{"model.dropout": 0.5})
    model = AlignmentModel(cfg.model, cfg.align, vocab_size=12, with_encoder=False)

    class Halve(torch.nn.Module):          # dropout with a known effect
        def forward(self, x):
            return 0.5 * x

    model.sentence.drop = Halve()
    sentences = [[4, 5, 6, 7, 8], [9, 4, 11]]
    tokens = torch.tensor([s + [0] * (5 - len(s)) for s in sentences])
    with torch.no_grad():
        s, _ = model.embed_words(tokens, torch.tensor([5, 3]))
        for i, sent in enumerate(sentences):
            torch.testing.assert_close(s[i, :len(sent)], _brnn_by_hand(model.sentence, sent, lambda x: 0.5 * x))


def test_brnn_matches_equations_2_to_6_with_padding():
    cfg = _cfg()
    model = AlignmentModel(cfg.model, cfg.align, vocab_size=12, with_encoder=False)
    sentences = [[4, 5, 6, 7, 8], [9, 4, 11], [10]]
    T = 6
    tokens = torch.tensor([s + [0] * (T - len(s)) for s in sentences])
    # junk after the end must not leak into the backward stream
    tokens[1, 3:] = torch.tensor([5, 6, 7])
    lengths = torch.tensor([len(s) for s in sentences])
    with torch.no_grad():
        s, mask = model.embed_words(tokens, lengths)
        for i, sent in enumerate(sentences):
            torch.testing.assert_close(s[i, :len(sent)], _brnn_by_hand(model.sentence, sent))
            assert torch.all(s[i, len(sent):] == 0)
    assert mask.tolist() == [[t < len(x) for t in range(T)] for x in sentences]


def test_bow_has_no_context():
    cfg = _cfg(**{"align.sentence_encoder": "bow"})
    model = AlignmentModel(cfg.model, cfg.align, vocab_size=12, with_encoder=False)
    enc = model.sentence
    tokens = torch.tensor([[4, 5, 6], [7, 5, 9]])
    with torch.no_grad():
        s, _ = model.embed_words(tokens, torch.tensor([3, 3]))
        x = enc.W_w.weight[5]
        expected = torch.relu(enc.W_d.weight @ torch.relu(enc.W_e.weight @ x + enc.W_e.bias) + enc.W_d.bias)
    torch.testing.assert_close(s[0, 1], expected)
    torch.testing.assert_close(s[1, 1], expected)  # same word, other neighbours: same vector


def _random_embeddings(B=3, M=4, L=5, T=6, h=7):
    v = torch.randn(B, M, h)
    s = torch.randn(L, T, h)
    v_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    lengths = torch.tensor([6, 1, 3, 4, 2])
    s_mask = torch.arange(T)[None] < lengths[:, None]
    return v, v_mask, s, s_mask


def test_eq8_and_eq7_scores_by_brute_force():
    v, v_mask, s, s_mask = _random_embeddings()
    S8, S7 = score_eq8(v, v_mask, s, s_mask), score_eq7(v, v_mask, s, s_mask)
    for k in range(v.shape[0]):
        for l in range(s.shape[0]):
            regions = [v[k, i] for i in range(v.shape[1]) if v_mask[k, i]]
            words = [s[l, t] for t in range(s.shape[1]) if s_mask[l, t]]
            e8 = sum(max(float(r @ w) for r in regions) for w in words)
            e7 = sum(max(0.0, float(r @ w)) for r in regions for w in words)
            assert S8[k, l].item() == pytest.approx(e8, rel=1e-5, abs=1e-5)
            assert S7[k, l].item() == pytest.approx(e7, rel=1e-5, abs=1e-5)


def test_model_scores_follow_config_and_word_region_scores_mask():
    v, v_mask, s, s_mask = _random_embeddings(B=5, L=5)
    v_mask = torch.ones(5, 4, dtype=torch.bool)
    v_mask[1, 2:] = False
    for score, fn in (("eq8", score_eq8), ("eq7", score_eq7)):
        cfg = _cfg(**{"align.score": score})
        model = AlignmentModel(cfg.model, cfg.align, vocab_size=10, with_encoder=False)
        torch.testing.assert_close(model.scores(v, v_mask, s, s_mask), fn(v, v_mask, s, s_mask))
    wr = AlignmentModel.word_region_scores(v, v_mask, s, s_mask)
    assert wr.shape == (5, 6, 4)
    assert wr[1, 0, 3] == float("-inf") and wr[1, 5, 0] == 0.0   # padded region, padded word
    assert wr[0, 2, 1].item() == pytest.approx(float(v[0, 1] @ s[0, 2]), rel=1e-5)


def test_word_pool_mean_divides_each_sentence_by_its_length():
    v, v_mask, s, s_mask = _random_embeddings()                      # sentence lengths 6, 1, 3, 4, 2
    for score, fn in (("eq8", score_eq8), ("eq7", score_eq7)):
        cfg = _cfg(**{"align.word_pool": "mean", "align.score": score})
        model = AlignmentModel(cfg.model, cfg.align, vocab_size=10, with_encoder=False)
        S, mean = fn(v, v_mask, s, s_mask), model.scores(v, v_mask, s, s_mask)
        torch.testing.assert_close(mean, S / torch.tensor([6.0, 1, 3, 4, 2])[None, :])


def test_box_geometry_adds_where_the_box_is_to_eq1():
    from dvsa.models.alignment import box_geometry

    g = box_geometry(torch.tensor([[0.0, 8, 16, 24]]), 32, 32)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.25, 0.5, 0.75, 0.25]]))
    cfg = _cfg(**{"model.roi_size": 2, "model.box_geometry": True})
    model = AlignmentModel(cfg.model, cfg.align, vocab_size=10).eval()
    images = torch.zeros(1, 3, 32, 32)                                # the same pixels in both boxes
    boxes = torch.tensor([[[0.0, 8, 8, 16], [24, 8, 32, 16]]])        # left, right
    with torch.no_grad():
        v, _ = model.embed_regions(images, boxes)
        plain = AlignmentModel(_cfg(**{"model.roi_size": 2}).model, cfg.align, vocab_size=10).eval()
        plain.load_state_dict({k: t for k, t in model.state_dict().items() if not k.startswith("W_g")})
        v0, _ = plain.embed_regions(images, boxes)
    torch.testing.assert_close(v0[0, 0], v0[0, 1])                    # appearance alone: no difference
    geo = model.W_g(box_geometry(boxes[0], 32, 32))
    torch.testing.assert_close(v[0], v0[0] + geo)                     # eq. 1 + W_g g(b)
    with pytest.raises(ValueError, match="needs the boxes"):
        model.embed_region_features(torch.zeros(1, 2, model.feat_dim), torch.ones(1, 2, dtype=torch.bool))


def test_ranking_loss_by_hand():
    S = torch.tensor([[3.0, 2.5, 0.0], [1.0, 1.0, 4.0], [0.0, 2.0, 2.5]])
    # rows (image k vs sentences l): k=0: max(0, 2.5-3+1)=0.5; k=1: max(0,1-1+1)=1, max(0,4-1+1)=4;
    # k=2: max(0, 2-2.5+1)=0.5 -> 6.0.   columns (sentence k vs images l): k=0: 1-3+1<0 -> 0;
    # k=1: 2.5-1+1=2.5, 2-1+1=2; k=2: max(0, 4-2.5+1)=2.5 -> 7.0
    assert ranking_loss(S, reduction="sum").item() == pytest.approx(13.0)
    assert ranking_loss(S).item() == pytest.approx(13.0 / 3)
    # hardest: rows 0.5 + 4 + 0.5, columns 0 + 2.5 + 2.5
    assert ranking_loss(S, hardest=True, reduction="sum").item() == pytest.approx(10.0)
    assert ranking_loss(S, margin=0.0, reduction="sum").item() == pytest.approx(0.0 + 3.0 + 0 + 1.5 + 1.0 + 1.5)
    with pytest.raises(ValueError, match="square"):
        ranking_loss(torch.zeros(2, 3))


def test_embed_regions_list_and_padded_boxes_agree():
    cfg = _cfg(**{"model.roi_size": 2})
    model = AlignmentModel(cfg.model, cfg.align, vocab_size=10).eval()
    images = torch.randn(2, 3, 32, 32)
    boxes = torch.tensor([[[0.0, 0, 32, 32], [4, 4, 20, 20], [0, 0, 1, 1]],
                          [[0.0, 0, 32, 32], [8, 0, 32, 16], [2, 2, 9, 9]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        v1, m1 = model.embed_regions(images, boxes, mask)
        v2, m2 = model.embed_regions(images, [boxes[0, :2], boxes[1]])
    assert v1.shape == (2, 3, 6) and torch.equal(m1, m2) and m1.tolist() == mask.tolist()
    torch.testing.assert_close(v1, v2)
    assert torch.all(v1[0, 2] == 0)


def test_word_vectors_file_initialises_known_words(tmp_path):
    path = tmp_path / "vec.txt"
    path.write_text("3 4\ncat 1 2 3 4\nzebra 9 9 9 9\ndog 0.5 0.5 0.5 0.5\n")
    cfg = _cfg(**{"model.word_vectors": str(path), "model.freeze_word_vectors": True})
    words = ["<pad>", "<start>", "<end>", "<unk>", "dog", "cat", "bird"]
    torch.manual_seed(1)
    model = AlignmentModel(cfg.model, cfg.align, vocab_size=7, words=words, with_encoder=False)
    torch.manual_seed(1)
    ref = AlignmentModel(_cfg().model, cfg.align, vocab_size=7, with_encoder=False)
    W = model.sentence.W_w.weight
    assert W[5].tolist() == [1, 2, 3, 4] and W[4].tolist() == [0.5] * 4
    assert torch.equal(W[6], ref.sentence.W_w.weight[6])  # "bird" is not in the file
    assert not W.requires_grad
    with pytest.raises(ValueError, match="pass the vocabulary words"):
        AlignmentModel(cfg.model, cfg.align, vocab_size=7, with_encoder=False)
    bad = tmp_path / "bad.txt"
    bad.write_text("cat 1 2 3 4\ndog 1 2 3\n")
    cfg_bad = _cfg(**{"model.word_vectors": str(bad)})
    with pytest.raises(DataError, match=r"bad.txt:2: word 'dog' has 3 values"):
        AlignmentModel(cfg_bad.model, cfg_bad.align, vocab_size=7, words=words, with_encoder=False)


def test_toy_alignment_ranks_true_pairs_first():
    """Eight images of three 'objects' each; each sentence names its image's objects."""
    torch.manual_seed(0)
    n_concepts, feat_dim, B = 10, 16, 8
    concept_feats = torch.randn(n_concepts, feat_dim)
    objects = torch.stack([torch.randperm(n_concepts)[:3] for _ in range(B)])       # [B, 3]
    feats = torch.cat([concept_feats[objects].mean(1, keepdim=True), concept_feats[objects]], 1)
    feats = feats + 0.05 * torch.randn_like(feats)                                   # [B, 4, feat]
    v_mask = torch.ones(B, 4, dtype=torch.bool)
    tokens = objects[:, torch.randperm(3)] + 4                                      # word ids 4..13
    lengths = torch.full((B,), 3)
    cfg = _cfg(**{"model.embed_dim": 16, "model.hidden_dim": 16, "model.word_dim": 8})
    model = AlignmentModel(cfg.model, cfg.align, vocab_size=14, with_encoder=False, feat_dim=feat_dim)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        S = model(None, None, v_mask, tokens, lengths, feats=feats)
        loss = model.loss(S)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        S = model(None, None, v_mask, tokens, lengths, feats=feats)
    assert S.argmax(dim=1).tolist() == list(range(B))   # image -> its sentence
    assert S.argmax(dim=0).tolist() == list(range(B))   # sentence -> its image
    assert loss.item() < 0.1
