"""Snippet alignment (section 3.1.4): a chain MRF over the words of a sentence, solved by Viterbi.

For a sentence of N words and an image of M regions, the latent a_j in {1..M} picks word j's
region. The best alignment maximises (eq. 10-12)::

    E(a) = sum_j psi_U(a_j) + sum_{j<N} beta * [a_j == a_{j+1}],    psi_U(a_j = i) = v_i^T s_j

(the paper writes "minimise the energy"; with scores as potentials that is this maximum).
beta = 0 gives each word its own best region; a large beta one region for the whole sentence.
"""

from __future__ import annotations

import torch
from torch import Tensor


def viterbi_align(unary: Tensor, lengths: Tensor, region_mask: Tensor, beta: float) -> Tensor:
    """Best alignment of a batch of sentences: long[L, N], the region per word, -1 on padding.

    unary: float[L, N, M] (``v_i^T s_t``), lengths: long[L] (words per sentence),
    region_mask: bool[L, M] (the regions sentence l may use). Runs in O(L N M): the best
    predecessor of region m is either m itself (+beta) or the best region overall.
    """
    if unary.dim() != 3:
        raise ValueError(f"unary must be float[L,N,M], got {tuple(unary.shape)}")
    L, N, M = unary.shape
    if lengths.shape != (L,) or region_mask.shape != (L, M):
        raise ValueError(f"lengths must be [{L}] and region_mask [{L},{M}], got "
                         f"{tuple(lengths.shape)} and {tuple(region_mask.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    lengths = lengths.to(unary.device).long()
    region_mask = region_mask.to(unary.device).bool()
    if ((lengths > N) | (lengths < 0)).any():
        bad = int(((lengths > N) | (lengths < 0)).nonzero()[0])
        raise ValueError(f"lengths[{bad}]={int(lengths[bad])} is outside 0..{N}")
    empty = (lengths > 0) & ~region_mask.any(dim=1)
    if empty.any():
        raise ValueError(f"sentence {int(empty.nonzero()[0])} has words but no region to align to")
    if N == 0:
        return torch.full((L, 0), -1, dtype=torch.long, device=unary.device)

    neg_inf = torch.tensor(float("-inf"), dtype=unary.dtype, device=unary.device)
    u = torch.where(region_mask[:, None, :], unary, neg_inf)         # [L, N, M]
    score = u[:, 0]                                                  # [L, M] best path ending in m
    same = torch.arange(M, device=unary.device).expand(L, M)
    back = []                                                        # N-1 x long[L, M]
    for j in range(1, N):
        best_val, best_idx = score.max(dim=1, keepdim=True)          # [L, 1]
        stay = score + beta                                          # a_{j-1} = m
        use_stay = stay >= best_val
        prev = torch.where(use_stay, same, best_idx.expand(L, M))    # [L, M]
        new = torch.maximum(stay, best_val) + u[:, j]
        live = (j < lengths)[:, None]                                # words past the end: carry
        score = torch.where(live, new, score)
        back.append(torch.where(live, prev, same))

    assign = torch.empty(L, N, dtype=torch.long, device=unary.device)
    cur = score.argmax(dim=1)                                        # [L] region of the last word
    assign[:, N - 1] = cur
    for j in range(N - 1, 0, -1):
        cur = back[j - 1].gather(1, cur[:, None]).squeeze(1)
        assign[:, j - 1] = cur
    steps = torch.arange(N, device=unary.device)[None, :]
    return assign.masked_fill(steps >= lengths[:, None], -1)


def snippets(assign_row: Tensor | list, length: int) -> list[tuple[int, int, int]]:
    """Runs of equal region in one alignment: ``[(region, start, end)]``, end exclusive."""
    row = assign_row.tolist() if isinstance(assign_row, Tensor) else list(assign_row)
    out: list[tuple[int, int, int]] = []
    start = 0
    for j in range(1, length + 1):
        if j == length or row[j] != row[start]:
            out.append((int(row[start]), start, j))
            start = j
    return out


def alignment_energy(unary_row: Tensor, assign_row: list[int], beta: float) -> float:
    """E(a) of eq. 10 for one sentence (unary [n, M], a list of n region indices)."""
    e = sum(float(unary_row[j, a]) for j, a in enumerate(assign_row))
    e += beta * sum(1 for j in range(len(assign_row) - 1) if assign_row[j] == assign_row[j + 1])
    return e
