"""MRF snippet alignment (eq. 10-12): Viterbi against brute-force enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch

from dvsa.models.mrf import alignment_energy, snippets, viterbi_align


def _brute_force(unary_row, n, regions, beta):
    best, best_a = float("-inf"), None
    for a in itertools.product(regions, repeat=n):
        e = alignment_energy(unary_row, list(a), beta)
        if e > best:
            best, best_a = e, list(a)
    return best, best_a


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0, 3.0])
def test_viterbi_equals_brute_force(beta):
    g = torch.Generator().manual_seed(int(beta * 10))
    L, N, M = 12, 5, 4
    unary = torch.randn(L, N, M, generator=g)
    lengths = torch.randint(0, N + 1, (L,), generator=g)
    lengths[0] = N
    region_mask = torch.rand(L, M, generator=g) < 0.7
    region_mask[:, 0] = True
    assign = viterbi_align(unary, lengths, region_mask, beta)
    assert assign.shape == (L, N)
    for l in range(L):
        n = int(lengths[l])
        regions = [m for m in range(M) if region_mask[l, m]]
        best, best_a = _brute_force(unary[l], n, regions, beta)
        got = assign[l, :n].tolist()
        assert got == best_a
        assert alignment_energy(unary[l], got, beta) == pytest.approx(best, abs=1e-5)
        assert assign[l, n:].tolist() == [-1] * (N - n)


def test_beta_zero_is_per_word_argmax():
    unary = torch.randn(6, 7, 5)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[:, 4] = False
    lengths = torch.full((6,), 7)
    assign = viterbi_align(unary, lengths, mask, beta=0.0)
    assert torch.equal(assign, unary[:, :, :4].argmax(dim=2))


def test_large_beta_gives_one_region_for_the_sentence():
    unary = torch.randn(6, 7, 5)
    lengths = torch.tensor([7, 5, 3, 1, 7, 2])
    mask = torch.ones(6, 5, dtype=torch.bool)
    assign = viterbi_align(unary, lengths, mask, beta=1e3)
    for l in range(6):
        n = int(lengths[l])
        best_region = int(unary[l, :n].sum(dim=0).argmax())
        assert assign[l, :n].tolist() == [best_region] * n


def test_hand_example_and_snippets():
    # words 0-1 prefer region 0, words 2-4 region 2; word 2 slightly prefers region 1
    unary = torch.tensor([[[2.0, 0, 0], [2, 0, 0], [0, 1.2, 1], [0, 0, 2], [0, 0, 2]]])
    lengths, mask = torch.tensor([5]), torch.ones(1, 3, dtype=torch.bool)
    assert viterbi_align(unary, lengths, mask, 0.0)[0].tolist() == [0, 0, 1, 2, 2]
    # beta = 0.5: keeping word 2 on region 2 gains 2 * 0.5 - 0.2 > 0 over switching twice
    a = viterbi_align(unary, lengths, mask, 0.5)[0]
    assert a.tolist() == [0, 0, 2, 2, 2]
    assert snippets(a, 5) == [(0, 0, 2), (2, 2, 5)]
    assert snippets([3, 3, 3, -1], 3) == [(3, 0, 3)]
    assert snippets([], 0) == []


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="no region"):
        viterbi_align(torch.zeros(2, 3, 2), torch.tensor([3, 1]), torch.tensor([[True, True], [False, False]]), 1.0)
    with pytest.raises(ValueError, match=r"lengths\[1\]=4"):
        viterbi_align(torch.zeros(2, 3, 2), torch.tensor([3, 4]), torch.ones(2, 2, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="beta"):
        viterbi_align(torch.zeros(1, 3, 2), torch.tensor([3]), torch.ones(1, 2, dtype=torch.bool), -1.0)
