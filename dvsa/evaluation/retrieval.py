"""Image-sentence retrieval (section 4.1): R@1/5/10 and median rank, both ways.

- image annotation (``i2t``): for each image, the rank of its best-ranked true sentence among
  all sentences;
- image search (``t2i``): for each sentence, the rank of its image among all images.

R@K is the percentage of queries whose rank is <= K; ``medr`` the median rank (1-based).
Ties count against the query (a score equal to the true one ranks ahead of it), so a
constant score matrix gives chance figures, not perfect ones.

Scores are never needed all at once: :func:`retrieval_ranks` takes a callback that scores a
block of images x sentences, and walks the matrix in chunks, so 5,000 images x 25,000
sentences with region/word embeddings fits in memory. :func:`fold_metrics` averages over
consecutive 1K-image folds (the paper's COCO 1K test), :func:`retrieval_metrics` takes the
full set.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]  # (image idx long[a], sentence idx long[b]) -> S float[a, b]
KS = (1, 5, 10)


def matrix_score_fn(S: Tensor) -> ScoreFn:
    """A callback over a precomputed S float[N_img, N_sent]."""
    return lambda img, sent: S[img][:, sent]


def model_score_fn(model, v: Tensor, v_mask: Tensor, s: Tensor, s_mask: Tensor) -> ScoreFn:
    """A callback scoring embedded regions (v [N_img,M,h]) against words (s [N_sent,T,h])
    with ``model.scores`` (eq. 8 or 7), block by block, without gradients."""
    def fn(img: Tensor, sent: Tensor) -> Tensor:
        with torch.no_grad():
            return model.scores(v[img], v_mask[img], s[sent], s_mask[sent])
    return fn


def _check_sent_img(sent_img: Tensor, n_img: int) -> Tensor:
    sent_img = torch.as_tensor(sent_img, dtype=torch.long)
    if sent_img.dim() != 1:
        raise ValueError(f"sent_img must be long[N_sent], got shape {tuple(sent_img.shape)}")
    if len(sent_img) and (int(sent_img.min()) < 0 or int(sent_img.max()) >= n_img):
        bad = int(((sent_img < 0) | (sent_img >= n_img)).nonzero()[0])
        raise ValueError(f"sent_img[{bad}]={int(sent_img[bad])} is not an image index in 0..{n_img - 1}")
    counts = torch.bincount(sent_img, minlength=n_img)
    if (counts == 0).any():
        raise ValueError(f"image {int((counts == 0).nonzero()[0])} has no sentence: image annotation "
                         f"is undefined for it")
    return sent_img


def retrieval_ranks(score_fn: ScoreFn, n_img: int, sent_img: Tensor, img_chunk: int = 100,
                    sent_chunk: int = 1000) -> tuple[Tensor, Tensor]:
    """0-based ranks: (i2t long[N_img], t2i long[N_sent]), scoring in chunks of
    ``img_chunk x sent_chunk``.

    Pass 1 scores every image against its own sentences (the true scores); pass 2 counts, block
    by block, how many wrong candidates score at least as high.
    """
    sent_img = _check_sent_img(sent_img, n_img)
    n_sent = len(sent_img)
    true_sent = torch.empty(n_sent)                    # S[img(l), l]
    best_true_img = torch.full((n_img,), float("-inf"))  # max over image k's true sentences
    for i0 in range(0, n_img, img_chunk):
        img = torch.arange(i0, min(i0 + img_chunk, n_img))
        sent = ((sent_img >= i0) & (sent_img < img[-1] + 1)).nonzero().squeeze(1)
        blk = score_fn(img, sent).float().cpu()        # [a, b]
        own = sent_img[sent] - i0                      # row of each sentence's image in blk
        true = blk.gather(0, own[None, :]).squeeze(0)  # [b]
        true_sent[sent] = true
        best_true_img.scatter_reduce_(0, sent_img[sent], true, reduce="amax")

    i2t = torch.zeros(n_img, dtype=torch.long)
    t2i = torch.zeros(n_sent, dtype=torch.long)
    for i0 in range(0, n_img, img_chunk):
        img = torch.arange(i0, min(i0 + img_chunk, n_img))
        for l0 in range(0, n_sent, sent_chunk):
            sent = torch.arange(l0, min(l0 + sent_chunk, n_sent))
            blk = score_fn(img, sent).float().cpu()    # [a, b]
            wrong = sent_img[sent][None, :] != img[:, None]
            i2t[img] += ((blk >= best_true_img[img][:, None]) & wrong).sum(dim=1)
            t2i[sent] += ((blk >= true_sent[sent][None, :]) & wrong).sum(dim=0)
    return i2t, t2i


def metrics_from_ranks(i2t: Tensor, t2i: Tensor) -> dict[str, float]:
    """0-based ranks -> {"i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "t2i_r1", ...} (R@K in %)."""
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        ranks = ranks.double()
        for k in KS:
            out[f"{name}_r{k}"] = 100.0 * float((ranks < k).double().mean())
        # median of the 1-based ranks (the lower middle one for an even count)
        out[f"{name}_medr"] = float(torch.floor(torch.median(ranks + 1)))
    return out


def retrieval_metrics(S_or_fn: Union[Tensor, ScoreFn], sent_img: Tensor, n_img: Optional[int] = None,
                      img_chunk: int = 100, sent_chunk: int = 1000) -> dict[str, float]:
    """R@1/5/10 and median rank both ways on the full set.

    ``S_or_fn``: S float[N_img, N_sent], or a score callback (then ``n_img`` is required).
    ``sent_img``: long[N_sent], the image of each sentence (five per image in the paper).
    """
    fn, n_img = _as_fn(S_or_fn, n_img)
    return metrics_from_ranks(*retrieval_ranks(fn, n_img, sent_img, img_chunk, sent_chunk))


def fold_metrics(S_or_fn: Union[Tensor, ScoreFn], sent_img: Tensor, fold_size: int = 1000,
                 n_img: Optional[int] = None, img_chunk: int = 100,
                 sent_chunk: int = 1000) -> dict[str, float]:
    """The metrics on consecutive folds of ``fold_size`` images (each with its own sentences),
    averaged over the folds; a last fold smaller than ``fold_size`` is left out unless it is
    the only one."""
    fn, n_img = _as_fn(S_or_fn, n_img)
    sent_img = _check_sent_img(sent_img, n_img)
    n_folds = max(1, n_img // fold_size)
    results = []
    for f in range(n_folds):
        i0, i1 = f * fold_size, (n_img if n_folds == 1 else (f + 1) * fold_size)
        sent = ((sent_img >= i0) & (sent_img < i1)).nonzero().squeeze(1)
        img = torch.arange(i0, i1)
        def sub_fn(a: Tensor, b: Tensor, img: Tensor = img, sent: Tensor = sent) -> Tensor:
            return fn(img[a], sent[b])

        ranks = retrieval_ranks(sub_fn, i1 - i0, sent_img[sent] - i0, img_chunk, sent_chunk)
        results.append(metrics_from_ranks(*ranks))
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def _as_fn(S_or_fn, n_img: Optional[int]) -> tuple[ScoreFn, int]:
    if isinstance(S_or_fn, Tensor):
        if S_or_fn.dim() != 2:
            raise ValueError(f"S must be float[N_img, N_sent], got {tuple(S_or_fn.shape)}")
        return matrix_score_fn(S_or_fn), S_or_fn.shape[0]
    if n_img is None:
        raise ValueError("n_img is required with a score callback")
    return S_or_fn, int(n_img)
