"""Image-sentence retrieval of a trained alignment model on a split (Table 1).

Every image of the split is embedded once (``v float[N, M, h]``: the whole image, then up to
``data.max_regions - 1`` proposals, else region boxes, exactly the boxes training ingest
gives the model), and every one of its sentences (``s float[L, T, h]``; up to
``sentences_per_image``, five in the paper; VG samples without full-image sentences use their
region captions). Image k and sentence l then score ``S_kl`` with the model's own eq. 8 (or 7),
block by block (:func:`dvsa.evaluation.retrieval.model_score_fn`), so the N x L matrix is never
held at once. Reported, both ways (``i2t`` image annotation, ``t2i`` image search): R@1/5/10 in
percent and the median rank, on the full split (``retrieval/...``: every image against every
sentence of the split, the paper's COCO 5K figures when the split holds 5,000 images) and, when the
split holds at least 1,000 images, averaged over its ``N // 1000`` folds of 1,000 consecutive
images (``retrieval_1k/...``, the paper's COCO 1K test; the last ``N mod 1000`` images count in
the full-split figures only). A smaller split (Flickr8K/30K's test is exactly 1,000; the demo's
120) has no 1K figures: its full-split R@K is against fewer candidates, so it reads higher than
a 1K test would. :func:`protocol_lines` says which is which.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from dvsa.config import Config
from dvsa.data.shards import iter_samples
from dvsa.errors import DataError, DvsaError
from dvsa.evaluation.retrieval import fold_metrics, model_score_fn, retrieval_metrics
from dvsa.inference.alignment import Embedder, alignment_boxes
from dvsa.inference.device import pick_device
from dvsa.ingest.decode import CorruptImage, decode_resize, scale_boxes
from dvsa.ingest.samples import encode_words
from dvsa.text import Vocab

log = logging.getLogger(__name__)


@dataclass
class EmbeddedSplit:
    v: torch.Tensor            # float[N, M, h] region embeddings (padded)
    v_mask: torch.Tensor       # bool[N, M]
    s: torch.Tensor            # float[L, T, h] word embeddings
    s_mask: torch.Tensor       # bool[L, T]
    sent_img: torch.Tensor     # long[L]: the image (row of v) of each sentence
    keys: list = field(default_factory=list)        # sample key per image
    sentences: list = field(default_factory=list)   # token list per sentence
    skipped: dict = field(default_factory=dict)     # images skipped, by reason


def _sentences(meta: dict, per_image: int) -> list[list[str]]:
    pool = [s["tokens"] for s in (meta.get("sentences") or []) if s.get("tokens")]
    if not pool:
        pool = [r["tokens"] for r in (meta.get("regions") or []) if r.get("tokens")]
    return pool[:per_image]


def _batches(shards: str, split: str, cfg: Config, vocab: Vocab, per_image: int, max_images: Optional[int],
             batch_size: int, skipped: Counter) -> Iterator[list[tuple]]:
    """Lists of (key, image uint8[3,S,S], boxes float[K,4] resized frame, [(ids, length, tokens)])."""
    batch, n = [], 0
    for key, jpg, meta in iter_samples(shards, split):
        if max_images and n >= max_images:
            break
        sents = _sentences(meta, per_image)
        if not sents:
            skipped["no_sentence"] += 1
            continue
        try:
            img, (w, h) = decode_resize(jpg, cfg.data.image_size, cfg.data.jpeg_decoder)
            raw_boxes = alignment_boxes(meta, cfg.data.max_regions, cfg.align.whole_image, w, h)
        except CorruptImage:
            skipped["corrupt_image" if jpg else "missing_image"] += 1
            continue
        except (KeyError, TypeError, ValueError) as e:
            skipped["bad_json"] += 1
            log.warning("retrieval: skipped %s: %s", key, e)
            continue
        encoded = [(*encode_words(vocab, t, cfg.data.max_len), list(t)) for t in sents]
        batch.append((key, img, scale_boxes(raw_boxes, w, h, cfg.data.image_size), encoded))
        n += 1
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def embed_split(model, vocab: Vocab, cfg: Config, shards: str, split: str = "test", *, sentences_per_image: int = 5,
                max_images: Optional[int] = None, batch_size: int = 16,
                device: Optional[str] = None) -> EmbeddedSplit:
    """Embed every image (regions) and sentence (words) of ``split`` with the alignment model."""
    if cfg.task != "align" or not hasattr(model, "embed_words"):
        raise DvsaError(f"retrieval needs an alignment model; this checkpoint is a {cfg.task!r} model")
    dev = pick_device(device)
    model = model.to(dev).eval()
    emb = Embedder(model, cfg, dev)
    skipped: Counter = Counter()
    vs, vms, ss, sms, sent_img, keys, sentences = [], [], [], [], [], [], []
    for batch in _batches(shards, split, cfg, vocab, sentences_per_image, max_images, batch_size, skipped):
        v, vm = emb.regions([b[1] for b in batch], [b[2] for b in batch])
        vs.append(v)
        vms.append(vm)
        rows = [(len(keys) + i, e) for i, b in enumerate(batch) for e in b[3]]
        tokens = np.stack([e[0] for _, e in rows])
        lengths = np.array([e[1] for _, e in rows], dtype=np.int64)
        s, sm = emb.words(tokens, lengths)
        ss.append(s)
        sms.append(sm)
        sent_img.extend(i for i, _ in rows)
        sentences.extend(e[2] for _, e in rows)
        keys.extend(b[0] for b in batch)
    if not keys:
        raise DataError(f"{shards}: no {split} image with a sentence to evaluate retrieval on")
    return EmbeddedSplit(torch.cat(vs), torch.cat(vms), torch.cat(ss), torch.cat(sms),
                         torch.tensor(sent_img, dtype=torch.long), keys, sentences, dict(skipped))


FOLD_SIZE = 1000   # the paper's COCO 1K test


def fold_prefix(fold_size: int) -> str:
    """The metric prefix of fold-averaged figures: ``retrieval_1k`` for 1,000-image folds."""
    return f"retrieval_{fold_size // 1000}k" if fold_size % 1000 == 0 else f"retrieval_{fold_size}"


def _with_rsum(prefix: str, r: dict) -> dict[str, float]:
    out = {f"{prefix}/{k}": float(v) for k, v in r.items()}
    out[f"{prefix}/rsum"] = float(sum(r[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    return out


def retrieval_from_embeddings(model, e: EmbeddedSplit, fold_size: int = FOLD_SIZE) -> dict[str, float]:
    """``retrieval/<k>`` on the whole set; with >= ``fold_size`` images also ``retrieval_1k/<k>``,
    the mean over its ``N // fold_size`` folds, and ``retrieval_1k/folds``."""
    model = model.cpu().eval()
    fn = model_score_fn(model, e.v, e.v_mask, e.s, e.s_mask)
    n = len(e.v)
    out = _with_rsum("retrieval", retrieval_metrics(fn, e.sent_img, n_img=n))
    out["retrieval/images"] = float(n)
    out["retrieval/sentences"] = float(len(e.sent_img))
    if n >= fold_size:
        prefix = fold_prefix(fold_size)
        out.update(_with_rsum(prefix, fold_metrics(fn, e.sent_img, fold_size=fold_size, n_img=n)))
        out[f"{prefix}/folds"] = float(n // fold_size)
    return out


def protocol_lines(metrics: dict, fold_size: int = FOLD_SIZE) -> list[str]:
    """Which retrieval figures are which, one line each (``dvsa evaluate`` prints them)."""
    n, sents = int(metrics["retrieval/images"]), int(metrics["retrieval/sentences"])
    prefix = fold_prefix(fold_size)
    lines = [f"retrieval/*: the full split, each of {n:,} images against all {sents:,} sentences and back"]
    folds = int(metrics.get(f"{prefix}/folds", 0))
    if folds:
        left = n - folds * fold_size
        lines.append(f"{prefix}/*: the mean over {folds} fold(s) of {fold_size:,} consecutive images "
                     f"(the paper's COCO 1K test)" + (f"; the last {left} image(s) are in no fold" if left else ""))
    else:
        lines.append(f"{prefix}/*: none: the split has {n:,} images, fewer than {fold_size:,}; the full-split "
                     f"figures are the only ones (R@K against {n:,} candidates reads higher than a 1K test)")
    return lines


def retrieval_table(metrics: dict, fold_size: int = FOLD_SIZE) -> str:
    """The retrieval figures as a small table: one row for the full split, one for the fold mean
    (when there is one), then :func:`protocol_lines`."""
    cols = [(d, k) for d in ("i2t", "t2i") for k in ("r1", "r5", "r10", "medr")]
    head = "| figures | " + " | ".join(f"{d} {'Med r' if k == 'medr' else 'R@' + k[1:]}" for d, k in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    prefix = fold_prefix(fold_size)
    n = int(metrics["retrieval/images"])
    rows = [("retrieval", f"full split ({n:,} images)")]
    if metrics.get(f"{prefix}/folds"):
        rows.append((prefix, f"{fold_size:,}-image folds (mean of {int(metrics[f'{prefix}/folds'])})"))
    for p, label in rows:
        cells = [f"{metrics[f'{p}/{d}_{k}']:.0f}" if k == "medr" else f"{metrics[f'{p}/{d}_{k}']:.1f}"
                 for d, k in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + protocol_lines(metrics, fold_size))


def evaluate_retrieval(model, vocab: Vocab, cfg: Config, shards: str, split: str = "test", *,
                       sentences_per_image: int = 5, max_images: Optional[int] = None, fold_size: int = FOLD_SIZE,
                       batch_size: int = 16, device: Optional[str] = None) -> tuple[dict[str, float], EmbeddedSplit]:
    """Retrieval metrics of a loaded alignment model on ``split`` (see module doc)."""
    e = embed_split(model, vocab, cfg, shards, split, sentences_per_image=sentences_per_image,
                    max_images=max_images, batch_size=batch_size, device=device)
    if e.skipped:
        log.warning("retrieval: skipped images by reason: %s", e.skipped)
    return retrieval_from_embeddings(model, e, fold_size), e
