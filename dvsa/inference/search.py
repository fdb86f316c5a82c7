"""Region search (Fig. 7): the regions of a split that score highest for a text query.

The query is embedded with the alignment model's sentence encoder (``s_t``, eq. 2-6); every
candidate region of every image (its detection ``proposals``, else its merged region
``groups``, else its ``regions``; not the whole image) is embedded by eq. 1 (``v_i``) and scored
``sum_t v_i^T s_t``.
"""

from __future__ import annotations

import heapq
from typing import Any, Optional

import torch

from dvsa.config import Config
from dvsa.data.shards import iter_samples
from dvsa.errors import DataError, DvsaError
from dvsa.inference.alignment import Embedder
from dvsa.ingest.decode import CorruptImage, decode_resize, scale_boxes
from dvsa.ingest.samples import encode_words
from dvsa.models.alignment import AlignmentModel
from dvsa.text import Vocab, clean_caption

SOURCES = ("auto", "proposals", "groups", "regions")


def query_tokens(query: str, vocab: Vocab, max_len: int) -> tuple[list[str], list[str]]:
    """(words the model knows, words it does not); DvsaError when it knows none."""
    words = clean_caption(query)[:max_len]
    known = [w for w in words if w in vocab]
    unknown = [w for w in words if w not in vocab]
    if not known:
        raise DvsaError(f"query {query!r}: none of its words is in the model's vocabulary "
                        f"({len(vocab)} words, e.g. {', '.join(vocab.itos[4:12])})")
    return known, unknown


def candidate_boxes(meta: dict, source: str) -> tuple[list[list[float]], list[str], str]:
    """(boxes in stored-image pixels, a label per box, the source used) of one sample."""
    order = ("proposals", "groups", "regions") if source == "auto" else (source,)
    for src in order:
        if src == "proposals" and meta.get("proposals"):
            return [list(map(float, b)) for b in meta["proposals"]], ["" for _ in meta["proposals"]], src
        if src == "groups" and meta.get("groups"):
            g = meta["groups"]
            return [list(map(float, x["box"])) for x in g], [(x.get("refs") or [""])[0] for x in g], src
        if src == "regions" and meta.get("regions"):
            r = meta["regions"]
            return [list(map(float, x["box"])) for x in r], [x.get("raw", "") for x in r], src
    return [], [], source


@torch.no_grad()
def search(model: torch.nn.Module, vocab: Vocab, cfg: Config, shards: str, query: str, split: str = "test",
           top: int = 8, source: str = "auto", max_images: Optional[int] = None, batch_size: int = 16) -> dict:
    """The ``top`` regions for ``query``: ``{results: [{key, image_id, box, score, label}], regions,
    images, skipped, unknown_words}`` (results best first)."""
    if cfg.task != "align" or not isinstance(model, AlignmentModel):
        raise DvsaError(f"search needs an alignment model; this checkpoint is a {cfg.task!r} model")
    if top < 1:
        raise DvsaError(f"--top must be >= 1, got {top}")
    known, unknown = query_tokens(query, vocab, cfg.data.max_len)
    model = model.cpu().eval()
    ids, n = encode_words(vocab, known, cfg.data.max_len)
    s, s_mask = model.embed_words(torch.from_numpy(ids)[None], torch.tensor([n]))   # [1, T, h]
    s_sum = (s * s_mask[..., None]).sum(dim=1)[0]                                   # [h]: sum_t s_t
    emb = Embedder(model, cfg, torch.device("cpu"))
    heap: list[tuple[float, int, dict[str, Any]]] = []          # min-heap of (score, order, result)
    stats = {"regions": 0, "images": 0}
    skipped: dict[str, int] = {}
    counter = 0

    def flush(batch):
        nonlocal counter
        M = max(len(b[2]) for b in batch)
        v, v_mask = emb.regions([b[1] for b in batch], [b[2] for b in batch], max_boxes=M)   # [B, M, h], eq. 1
        scores = (v @ s_sum).masked_fill(~v_mask, float("-inf"))                   # [B, M]: sum_t v_i^T s_t
        for b, (key, _, _, boxes, labels, image_id) in enumerate(batch):
            for i in range(len(boxes)):
                item = (float(scores[b, i]), -counter,
                        {"key": key, "image_id": image_id, "box": boxes[i], "label": labels[i]})
                counter += 1
                if len(heap) < top:
                    heapq.heappush(heap, item)
                else:
                    heapq.heappushpop(heap, item)

    batch = []
    for key, jpg, meta in iter_samples(shards, split):
        if max_images and stats["images"] >= max_images:
            break
        boxes, labels, _ = candidate_boxes(meta, source)
        if not boxes:
            continue
        try:
            img, (w, h) = decode_resize(jpg, cfg.data.image_size, cfg.data.jpeg_decoder)
        except CorruptImage:
            reason = "corrupt_image" if jpg else "missing_image"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        batch.append((key, img, scale_boxes(boxes, w, h, cfg.data.image_size), boxes, labels,
                      meta.get("image_id", key)))
        stats["images"] += 1
        stats["regions"] += len(boxes)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if not stats["regions"]:
        raise DataError(f"{shards}: no {split} image has candidate regions ({source})")
    results = []
    for score, _, r in sorted(heap, key=lambda x: (-x[0], -x[1])):
        results.append({**r, "score": score})
    return {"results": results, "unknown_words": unknown, **stats, "skipped": skipped}
