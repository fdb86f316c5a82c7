"""``dvsa stats SHARDS...``: region vs full-image caption statistics (table, JSON, PNG)."""

from __future__ import annotations

from dvsa.data.stats import collect, plot, table
from dvsa.errors import DvsaError

HELP = "region vs full-image caption statistics of prepared shards (table + PNG)"


def add_arguments(parser) -> None:
    parser.add_argument("shards", nargs="+", help="prepared shard directories (VG and/or Karpathy)")
    parser.add_argument("--split", default="train", help="split to describe (default train; 'all' for every split)")
    parser.add_argument("--out", default=None,
                        help="directory or fsspec URL for stats.json and stats.png (default: the first SHARDS)")
    parser.add_argument("--top", type=int, default=20, help="top words kept")


def run(args) -> int:
    import json
    import posixpath

    import fsspec

    split = None if args.split == "all" else args.split
    stats = collect(args.shards, split, args.top)
    if not stats["region"]["captions"] and not stats["full_image"]["captions"]:
        raise DvsaError(f"no captions in split {args.split!r} of {', '.join(args.shards)}")
    out = str(args.out or args.shards[0]).rstrip("/")
    fs, base = fsspec.core.url_to_fs(out)
    fs.makedirs(base, exist_ok=True)
    print(table(stats))
    json_path, png_path = posixpath.join(out, "stats.json"), posixpath.join(out, "stats.png")
    with fsspec.open(json_path, "w") as f:
        json.dump({"split": args.split, "shards": args.shards, **stats}, f, indent=1)
    plot(stats, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0
