"""``dvsa snippets --checkpoint ALIGN --shards DIR --out DIR``: MRF snippet alignment over a
shard set (a Ray Data batch-inference job) written as region-snippet shards; see
:mod:`dvsa.experiments.snippets`. Then::

    dvsa train-caption --config configs/tiny.yaml data.shards=DIR caption.mode=region
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dvsa import runtime
from dvsa.errors import DvsaError
from dvsa.experiments.snippets import SnippetOptions, checkpoint_figure, write_snippet_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="trained alignment model: checkpoint dir, Ray Train run dir, MLflow run id, or MLflow "
                             "model URI (runs:/<run id>/model, models:/<name>/<version|latest>, "
                             "models:/<name>@<alias>; store: MLFLOW_TRACKING_URI)")
    parser.add_argument("--shards", required=True, help="source shards (Karpathy split with proposals)")
    parser.add_argument("--out", required=True, help="output directory (or fsspec URL) for the snippet shards")
    parser.add_argument("--splits", default="train,val",
                        help="comma-separated splits to align (train-caption needs train and val)")
    parser.add_argument("--beta", type=float, default=None, help="MRF beta (default: the checkpoint's align.mrf_beta)")
    parser.add_argument("--exclude-full-image", action="store_true",
                        help="leave out snippets aligned to the whole image (counted in the manifest)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per map_batches call")
    parser.add_argument("--concurrency", type=int, default=1, help="aligner actors")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per aligner actor")
    parser.add_argument("--figure-split", default="val",
                        help="split of the Fig. 5 example (written to OUT/fig5_alignment.png); '' for none")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or local)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of an embedded local Ray")


def run(args: argparse.Namespace) -> int:

    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    if not splits:
        raise DvsaError("--splits: name at least one split")
    if args.batch_size < 1 or args.concurrency < 1:
        raise DvsaError("--batch-size and --concurrency must be >= 1")
    local_out = "://" not in args.out
    ray_dir = os.environ.get("DVSA_OUT", "runs")   # an embedded Ray's temp dir: not inside the shard dir
    with runtime.ray_session(ray_dir, args.ray_address, args.num_cpus):
        m = write_snippet_shards(args.checkpoint, args.shards, args.out, SnippetOptions(
            splits=splits, beta=args.beta, include_full_image=not args.exclude_full_image,
            batch_size=args.batch_size, concurrency=args.concurrency, use_gpu=args.use_gpu))
    for split, c in m.splits.items():
        print(f"{split:<6} {c.images:>7} images {c.regions:>8} snippets {c.groups:>7} groups "
              f"{m.split_count(split, 'shards'):>4} shards")
    drops = {k: v for k, v in m.tally.dropped_dict().items() if v}
    if drops:
        print("dropped: " + "; ".join(f"{k}: " + ", ".join(f"{r}={n}" for r, n in v.items()) for k, v in drops.items()))
    print(f"{m.info['snippets_per_sentence']} snippets per sentence, {m.info['words_per_snippet']} words "
          f"per snippet (beta={m.params['beta']:g}); vocab {m.vocab.size} words")
    if args.figure_split and local_out:
        fig = checkpoint_figure(args.checkpoint, args.shards, args.figure_split, Path(args.out) / "fig5_alignment.png",
                                beta=args.beta)
        if fig:
            print(f"Fig. 5 example: {fig}")
    print(f"next: dvsa train-caption --config configs/tiny.yaml data.shards={args.out} caption.mode=region")
    return 0
