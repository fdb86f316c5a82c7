"""``dvsa demo [--out DIR] [--images N] [--seed S] [--preset MODEL=FILE] [key=value ...]``: the whole pipeline on a
synthetic world, on a local Ray (see :mod:`dvsa.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dvsa.demo import DemoOptions, run_demo
from dvsa.errors import DvsaError

HELP = "the whole pipeline on a synthetic world on a local Ray, in minutes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    parser.add_argument("--images", type=int, default=None, help="images in the synthetic world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", action="append", default=[], metavar="MODEL=FILE",
                        help="train MODEL (region, fullframe, align) from FILE instead of its shipped preset "
                             "(configs/demo_MODEL.yaml); repeatable")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a paper claim is not reproduced")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training overrides, e.g. train.epochs=4")


def run(args: argparse.Namespace) -> int:
    opts = DemoOptions(out=Path(args.out), seed=args.seed, overrides=list(args.overrides),
                       presets=_presets(args.preset), num_cpus=args.num_cpus)
    if args.images is not None:
        if args.images < 50:
            raise DvsaError(f"--images must be >= 50 (the world needs val and test images), got {args.images}")
        opts.images = args.images
    res = run_demo(opts)
    return 1 if (args.strict and not res.ok) else 0


def _presets(items: list) -> dict:
    presets = {}
    for item in items:
        model, sep, path = item.partition("=")
        if not sep or not path.strip():
            raise DvsaError(f"--preset {item!r}: expected MODEL=FILE (e.g. align=configs/demo_align.yaml)")
        presets[model.strip()] = Path(path.strip())
    return presets
