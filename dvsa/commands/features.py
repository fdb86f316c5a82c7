"""``dvsa features --config CFG --out DIR``: frozen-CNN features once, as feature shards."""

from __future__ import annotations

from dvsa.config import load_config
from dvsa.errors import DvsaError
from dvsa.features import DEFAULT_SAMPLES_PER_SHARD, compute_features
from dvsa.runtime import ray_session

HELP = "precompute frozen-CNN features once as feature shards (Ray Data job)"


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML preset (model.* picks the CNN; model.trainable must be false)")
    parser.add_argument("--out", required=True, help="output directory (or fsspec URL) for the feature shards")
    parser.add_argument("--shards", default=None, help="image shards to read (default: data.shards)")
    parser.add_argument("--splits", default="train,val,test", help="comma-separated splits (default: train,val,test)")
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                        help="images per feature shard")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored feature dtype")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. model.backbone=resnet50")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)          # validated before Ray starts
    if args.samples_per_shard <= 0:
        raise DvsaError(f"--samples-per-shard: must be a positive integer, got {args.samples_per_shard}")
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    if not splits:
        raise DvsaError("--splits: name at least one split")
    with ray_session(cfg.out, cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus):
        m = compute_features(cfg, args.out, shards=args.shards, splits=splits,
                             samples_per_shard=args.samples_per_shard, dtype=args.dtype)
    for split, s in m.splits.items():
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(s.skipped.items())) or "none"
        print(f"{split}: {s.samples} images in {len(m.shards_of(split))} shards (skipped: {skipped})")
    print(f"wrote {args.out}/features.json (feat_dim {m.feat_dim}); train with data.features={args.out}")
    return 0
