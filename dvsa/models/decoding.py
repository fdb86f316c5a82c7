"""Caption decoding on a :class:`~dvsa.models.captioner.Captioner`: greedy, sampling, beam search.

Every decoder runs all N feature rows at once and returns ``(tokens long[N, max_len-1],
logprob float[N])``: the generated ids (words, then END if it came, then PAD=0) and the
caption's log probability under the model, END included (the paper sorts region captions by
it). PAD and START are never generated. ``max_len`` bounds the encoded caption
``[START, w..., END]`` as ``data.max_len`` does, so at most ``max_len - 1`` ids are generated;
a caption that has not ended by then is cut there.

Beam search keeps images x beams in one ``[N*k, ...]`` state and picks, per image, the k
best of k*V continuations with one ``topk``; finished beams carry over with their score.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dvsa.config import CaptionConfig
from dvsa.models.captioner import END, PAD, START, Captioner, State


def _never_generated(logp: Tensor) -> Tensor:
    """PAD and START are inputs, never outputs: rule them out (the others' scores are kept)."""
    logp = logp.clone()
    logp[:, PAD] = float("-inf")
    logp[:, START] = float("-inf")
    return logp


def _reorder(state: State, index: Tensor) -> State:
    return tuple(s.index_select(0, index) for s in state)


def _check(feats: Tensor, max_len: int) -> int:
    if feats.dim() != 2:
        raise ValueError(f"feats must be float[N, feat_dim], got {tuple(feats.shape)}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (START and one generated id), got {max_len}")
    return max_len - 1


@torch.no_grad()
def greedy(captioner: Captioner, feats: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """The most likely word at every step."""
    return _ancestral(captioner, feats, max_len, temperature=None, generator=None)


@torch.no_grad()
def sample(captioner: Captioner, feats: Tensor, max_len: int, temperature: float = 1.0,
           generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Draw each word from softmax(logits / temperature); the returned log probability is
    the model's own (temperature 1)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _ancestral(captioner, feats, max_len, temperature=temperature, generator=generator)


def _ancestral(captioner: Captioner, feats: Tensor, max_len: int, temperature: Optional[float],
               generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    steps = _check(feats, max_len)
    n = feats.shape[0]
    state = captioner.init_state(feats)
    prev = torch.full((n,), START, dtype=torch.long, device=feats.device)
    tokens = torch.full((n, steps), PAD, dtype=torch.long, device=feats.device)
    logprob = feats.new_zeros(n)
    done = torch.zeros(n, dtype=torch.bool, device=feats.device)
    for t in range(steps):
        logp, state = captioner.step(prev, state)                     # [N, V]
        logp = _never_generated(logp)
        if temperature is None:
            tok = logp.argmax(dim=-1)
        else:
            probs = torch.softmax(logp / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tok = tok.masked_fill(done, PAD)
        logprob = logprob + logp.gather(1, tok[:, None]).squeeze(1).masked_fill(done, 0.0)
        tokens[:, t] = tok
        done = done | (tok == END)
        prev = tok
        if bool(done.all()):
            break
    return tokens, logprob


@torch.no_grad()
def beam_search(captioner: Captioner, feats: Tensor, max_len: int, beam_size: int = 3,
                return_beams: bool = False) -> tuple[Tensor, Tensor]:
    """Beam search, batched over images and beams.

    Returns the best caption per row, or with ``return_beams`` all k:
    ``(tokens long[N, k, max_len-1], logprob float[N, k])``, best first.
    """
    steps = _check(feats, max_len)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    n, k, dev = feats.shape[0], beam_size, feats.device
    state = _reorder(captioner.init_state(feats), torch.arange(n, device=dev).repeat_interleave(k))
    prev = torch.full((n * k,), START, dtype=torch.long, device=dev)
    scores = feats.new_full((n, k), float("-inf"))
    scores[:, 0] = 0.0                                                # one live beam to start from
    seqs = torch.full((n, k, 0), PAD, dtype=torch.long, device=dev)
    done = torch.zeros(n, k, dtype=torch.bool, device=dev)
    row_base = (torch.arange(n, device=dev) * k)[:, None]             # [N, 1]
    for _ in range(steps):
        logp, state = captioner.step(prev, state)                     # [N*k, V]
        V = logp.shape[-1]
        logp = _never_generated(logp).view(n, k, V)
        # a finished beam has exactly one continuation, PAD, at no cost
        finished_row = torch.full((V,), float("-inf"), device=dev, dtype=logp.dtype)
        finished_row[PAD] = 0.0
        logp = torch.where(done[:, :, None], finished_row, logp)
        cand = (scores[:, :, None] + logp).view(n, k * V)             # [N, k*V]
        scores, flat = cand.topk(k, dim=1)                            # [N, k]
        beam, tok = flat // V, flat % V
        seqs = torch.cat([seqs.gather(1, beam[:, :, None].expand(-1, -1, seqs.shape[2])),
                          tok[:, :, None]], dim=2)
        done = done.gather(1, beam) | (tok == END)
        state = _reorder(state, (row_base + beam).view(-1))
        prev = tok.view(-1)
        if bool(done.all()):
            break
    if seqs.shape[2] < steps:
        seqs = torch.cat([seqs, seqs.new_full((n, k, steps - seqs.shape[2]), PAD)], dim=2)
    if return_beams:
        return seqs, scores
    return seqs[:, 0], scores[:, 0]


def decode(captioner: Captioner, feats: Tensor, max_len: int, caption_cfg: CaptionConfig,
           generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Decode with ``caption.decode`` (beam | greedy | sample), ``beam_size``, ``temperature``."""
    if caption_cfg.decode == "beam":
        return beam_search(captioner, feats, max_len, caption_cfg.beam_size)
    if caption_cfg.decode == "greedy":
        return greedy(captioner, feats, max_len)
    if caption_cfg.decode == "sample":
        return sample(captioner, feats, max_len, caption_cfg.temperature, generator)
    raise ValueError(f"caption.decode: {caption_cfg.decode!r} is not one of 'beam', 'greedy', 'sample'")
