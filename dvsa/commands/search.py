"""``dvsa search "QUERY" --checkpoint ALIGN_RUN_OR_PATH --shards DIR [--split test] [--top 8]``

Fig. 7: the regions of a split that score highest for a text query. The query is embedded
with the alignment model's sentence encoder (``s_t``, eq. 2-6); every region of every image
(its detection ``proposals``, else its merged region ``groups``, else its ``regions``; not the
whole image) is embedded by eq. 1 (``v_i``), and scored ``sum_t v_i^T s_t``. The best ``--top``
are printed and drawn as a grid (``<out>/search_<query>.png``).
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import numpy as np

from dvsa import tracking
from dvsa.errors import DataError
from dvsa.evaluation.regions import iter_images
from dvsa.inference.checkpoints import load_trained
from dvsa.inference.search import SOURCES, search
from dvsa.viz import draw_search_results

HELP = "top-scoring regions of the test set for a text query"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="the text query, e.g. \"red circle\"")
    parser.add_argument("--checkpoint", required=True,
                        help="alignment model: checkpoint dir, run dir, MLflow run id, or MLflow model URI "
                             "(runs:/<run id>/model, models:/<name>/<version|latest>, models:/<name>@<alias>)")
    parser.add_argument("--shards", required=True, help="prepared shard directory (or URL)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--top", type=int, default=8, help="how many regions to show (default 8)")
    parser.add_argument("--regions", choices=SOURCES, default="auto",
                        help="which boxes are candidates (auto: proposals, else groups, else regions)")
    parser.add_argument("--max-images", type=int, default=None, help="search only the first N images")
    parser.add_argument("--out", default="runs/search", help="where the picture goes (default: runs/search)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store holding the run or model (for a run id or a runs:/, models:/ URI)")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "query"


def draw(found: dict, query: str, shards: str, split: str, path: Path) -> Path:
    from PIL import Image

    images = {}
    for key, jpg, _ in iter_images(shards, split, [r["key"] for r in found["results"]]):
        with Image.open(io.BytesIO(jpg)) as im:
            images[key] = np.asarray(im.convert("RGB"))
    rs = found["results"]
    return draw_search_results(query, [(images[r["key"]], r["box"]) for r in rs], [r["score"] for r in rs],
                               path, labels=[f"image {r['image_id']}" for r in rs])


def run(args: argparse.Namespace) -> int:
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
