"""Decoding: beam search against brute force, greedy == beam k=1, sampling, batching."""

from __future__ import annotations

import itertools

import pytest
import torch

from dvsa.config import Config
from dvsa.models.captioner import Captioner
from dvsa.models.decoding import beam_search, decode, greedy, sample

PAD, START, END = 0, 1, 2




def _captioner(cell: str, V: int, seed: int) -> Captioner:
    torch.manual_seed(seed)
    cfg = Config().replace(**{"model.backbone": "tiny", "model.hidden_dim": 8, "model.word_dim": 6,
                              "caption.cell": cell})
    cap = Captioner(cfg.model, cfg.caption, vocab_size=V, feat_dim=4).eval()
    with torch.no_grad():  # sharper distributions than the default init: beams really differ
        cap.W_oh.weight.mul_(4.0)
    return cap


def _sequence_logprob(cap: Captioner, feat: torch.Tensor, seq: list[int]) -> float:
    state = cap.init_state(feat[None])
    prev, total = torch.tensor([START]), 0.0
    with torch.no_grad():
        for tok in seq:
            logp, state = cap.step(prev, state)
            total += float(logp[0, tok])
            prev = torch.tensor([tok])
    return total


def _all_captions(V: int, steps: int):
    """Every caption of at most ``steps`` ids: words then END, or ``steps`` words cut there."""
    words = list(range(3, V))
    for n in range(steps):
        for ws in itertools.product(words, repeat=n):
            yield list(ws) + [END]
    yield from (list(ws) for ws in itertools.product(words, repeat=steps))


@pytest.mark.parametrize("cell,V", [("rnn", 5), ("lstm", 5), ("rnn", 7)])
def test_wide_beam_finds_the_brute_force_best(cell, V):
    steps = 4                                               # T = 4 generated ids
    cap = _captioner(cell, V, seed=V)
    feats = torch.randn(3, 4)
    k = (V - 3) ** steps + steps                            # wider than every live prefix set
    tokens, logprob = beam_search(cap, feats, max_len=steps + 1, beam_size=k)
    beams, beam_lp = beam_search(cap, feats, max_len=steps + 1, beam_size=k, return_beams=True)
    for n in range(3):
        scored = sorted(((_sequence_logprob(cap, feats[n], c), c) for c in _all_captions(V, steps)),
                        key=lambda x: -x[0])
        best_lp, best = scored[0]
        got = [t for t in tokens[n].tolist() if t != PAD]
        assert got == best
        assert logprob[n].item() == pytest.approx(best_lp, abs=1e-4)
        # the top beams are the brute-force top captions, in order
        top = min(5, len(scored))
        assert beam_lp[n, :top].tolist() == pytest.approx([s for s, _ in scored[:top]], abs=1e-4)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_greedy_equals_beam_of_one(cell):
    cap = _captioner(cell, V=11, seed=3)
    feats = torch.randn(16, 4)
    g_tok, g_lp = greedy(cap, feats, max_len=9)
    b_tok, b_lp = beam_search(cap, feats, max_len=9, beam_size=1)
    assert torch.equal(g_tok, b_tok)
    torch.testing.assert_close(g_lp, b_lp)
    for n in range(4):
        seq = [t for t in g_tok[n].tolist() if t != PAD]
        assert g_lp[n].item() == pytest.approx(_sequence_logprob(cap, feats[n], seq), abs=1e-5)


def test_batched_beam_equals_one_image_at_a_time():
    cap = _captioner("lstm", V=13, seed=4)
    feats = torch.randn(6, 4)
    tok, lp = beam_search(cap, feats, max_len=8, beam_size=3)
    for n in range(6):
        t1, l1 = beam_search(cap, feats[n:n + 1], max_len=8, beam_size=3)
        assert torch.equal(t1[0], tok[n])
        assert l1.item() == pytest.approx(lp[n].item(), abs=1e-5)


def test_outputs_end_then_pad_and_never_pad_or_start_inside():
    cap = _captioner("rnn", V=9, seed=5)
    feats = torch.randn(8, 4)
    for tokens, _ in (greedy(cap, feats, 7), beam_search(cap, feats, 7, 3), sample(cap, feats, 7)):
        assert tokens.shape == (8, 6)
        for row in tokens.tolist():
            n = row.index(END) + 1 if END in row else len(row)
            assert all(t >= 2 for t in row[:n]) and all(t == PAD for t in row[n:])


def test_sampling_is_reproducible_and_scores_with_the_model():
    cap = _captioner("lstm", V=9, seed=6)
    feats = torch.randn(5, 4)
    a = sample(cap, feats, 7, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = sample(cap, feats, 7, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0])
    for n in range(5):
        seq = [t for t in a[0][n].tolist() if t != PAD]
        assert a[1][n].item() == pytest.approx(_sequence_logprob(cap, feats[n], seq), abs=1e-5)
    cold = sample(cap, feats, 7, temperature=1e-4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(cold[0], greedy(cap, feats, 7)[0])
    with pytest.raises(ValueError, match="temperature"):
        sample(cap, feats, 7, temperature=0.0)


def test_decode_dispatches_on_config():
    cap = _captioner("rnn", V=9, seed=7)
    feats = torch.randn(4, 4)
    cfg = Config().replace(**{"caption.decode": "greedy"}).caption
    assert torch.equal(decode(cap, feats, 7, cfg)[0], greedy(cap, feats, 7)[0])
    cfg = Config().replace(**{"caption.decode": "beam", "caption.beam_size": 2}).caption
    assert torch.equal(decode(cap, feats, 7, cfg)[0], beam_search(cap, feats, 7, 2)[0])
