"""``dvsa search "QUERY" --checkpoint ALIGN_RUN_OR_PATH --shards DIR [--split test] [--top 8]``

Fig. 7: the regions of a split that score highest for a text query. The query is embedded
with the alignment model's sentence encoder (``s_t``, eq. 2-6); every region of every image
(its detection ``proposals``, else its merged region ``groups``, else its ``regions``; not the
whole image) is embedded by eq. 1 (``v_i``), and scored ``sum_t v_i^T s_t``. The best ``--top``
are printed and drawn as a grid (``<out>/search_<query>.png``).
"""

from __future__ import annotations

import argparse
import heapq
import io
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dvsa.errors import DataError, DvsaError

HELP = "top-scoring regions of the test set for a text query"
SOURCES = ("auto", "proposals", "groups", "regions")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="the text query, e.g. \"red circle\"")
    parser.add_argument("--checkpoint", required=True, help="alignment model: checkpoint dir, run dir or MLflow run id")
    parser.add_argument("--shards", required=True, help="prepared shard directory (or URL)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--top", type=int, default=8, help="how many regions to show (default 8)")
    parser.add_argument("--regions", choices=SOURCES, default="auto",
                        help="which boxes are candidates (auto: proposals, else groups, else regions)")
    parser.add_argument("--max-images", type=int, default=None, help="search only the first N images")
    parser.add_argument("--out", default="runs/search", help="where the picture goes (default: runs/search)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store holding the run (for a run id)")


def query_tokens(query: str, vocab, max_len: int) -> tuple[list[str], list[str]]:
    """(words the model knows, words it does not); DvsaError when it knows none."""
    from dvsa.text import clean_caption

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
def search(model, vocab, cfg, shards: str, query: str, split: str = "test", top: int = 8,
           source: str = "auto", max_images: Optional[int] = None, batch_size: int = 16) -> dict:
    """The ``top`` regions for ``query``: ``{results: [{key, image_id, box, score, label}], regions,
    images, skipped, unknown_words}`` (results best first)."""
    from dvsa.data.shards import iter_samples
    from dvsa.evaluation.alignment_eval import _Embedder
    from dvsa.ingest.decode import CorruptImage, decode_resize, scale_boxes
    from dvsa.ingest.samples import encode_words

    if cfg.task != "align" or not hasattr(model, "embed_words"):
        raise DvsaError(f"search needs an alignment model; this checkpoint is a {cfg.task!r} model")
    if top < 1:
        raise DvsaError(f"--top must be >= 1, got {top}")
    known, unknown = query_tokens(query, vocab, cfg.data.max_len)
    model = model.cpu().eval()
    ids, n = encode_words(vocab, known, cfg.data.max_len)
    s, s_mask = model.embed_words(torch.from_numpy(ids)[None], torch.tensor([n]))   # [1, T, h]
    s_sum = (s * s_mask[..., None]).sum(dim=1)[0]                                   # [h]: sum_t s_t
    emb = _Embedder(model, cfg, torch.device("cpu"))
    heap: list = []          # min-heap of (score, order, result)
    stats = {"regions": 0, "images": 0, "skipped": {}}
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
            stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
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
    return {"results": results, "unknown_words": unknown, **stats}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "query"


def draw(found: dict, query: str, shards: str, split: str, path: Path) -> Path:
    from PIL import Image

    from dvsa.evaluation.regions import iter_images
    from dvsa.viz import draw_search_results

    images = {}
    for key, jpg, _ in iter_images(shards, split, [r["key"] for r in found["results"]]):
        with Image.open(io.BytesIO(jpg)) as im:
            images[key] = np.asarray(im.convert("RGB"))
    rs = found["results"]
    return draw_search_results(query, [(images[r["key"]], r["box"]) for r in rs], [r["score"] for r in rs],
                               path, labels=[f"image {r['image_id']}" for r in rs])


def run(args: argparse.Namespace) -> int:
    from dvsa import tracking
    from dvsa.train.checkpoints import load_trained

    if "://" not in args.shards and not Path(args.shards).is_dir():
        raise DataError(f"--shards: no such shard directory: {args.shards}")
    uri = args.tracking_uri or tracking.tracking_uri(Path("runs").resolve())
    model, vocab, cfg = load_trained(args.checkpoint, uri)
    found = search(model, vocab, cfg, args.shards, args.query, args.split, args.top, args.regions,
                   args.max_images)
    if found["unknown_words"]:
        print(f"note: words not in the vocabulary, ignored: {', '.join(found['unknown_words'])}")
    if found["skipped"]:
        print(f"skipped images (counted): {found['skipped']}")
    print(f"query {args.query!r}: top {len(found['results'])} of {found['regions']} regions "
          f"in {found['images']} {args.split} images")
    for k, r in enumerate(found["results"], 1):
        box = ", ".join(f"{v:.0f}" for v in r["box"])
        label = f"  \"{r['label']}\"" if r["label"] else ""
        print(f"  {k:2d}. {r['score']:9.4f}  image {r['image_id']}  [{box}]{label}")
    path = draw(found, args.query, args.shards, args.split, Path(args.out) / f"search_{_slug(args.query)}.png")
    print(f"picture: {path}")
    return 0
