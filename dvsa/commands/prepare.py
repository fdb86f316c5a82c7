"""``dvsa prepare vg|karpathy``: raw data -> WebDataset shards + manifest.json + vocab.json."""

from __future__ import annotations

from dvsa.data.image_files import DEFAULT_MAX_IMAGE_BYTES
from dvsa.data.manifest import DEFAULT_SHARD_BYTES
from dvsa.data.prepare import (
    DEFAULT_CHUNK_IMAGES,
    KarpathySource,
    PrepareOptions,
    VGSource,
    prepare_karpathy,
    prepare_vg,
    summary,
)

HELP = "turn VG or Karpathy-split data into WebDataset shards (+ manifest, vocab)"


def _common(p) -> None:
    p.add_argument("--out", required=True, help="output directory or fsspec URL")
    p.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="target shard size in bytes")
    p.add_argument("--max-side", type=int, default=None, help="downscale images once so the longer side is <= PX")
    p.add_argument("--chunk-images", type=int, default=DEFAULT_CHUNK_IMAGES, help="images per Ray task")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    p.add_argument("--verify", choices=("decode", "markers"), default="decode",
                   help="check each JPEG by decoding it (default, at 1/8 scale) or by its markers only (faster)")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                   help="a larger image file is dropped as too_large without being read (default 64 MiB)")
    p.add_argument("--recheck", choices=("sha256", "size"), default="sha256",
                   help="how a re-run checks the shards of finished chunks before skipping them: "
                        "size and sha256 (default; reads each shard again) or size only")
    p.add_argument("--no-ray", action="store_true", help="process chunks in this process (debugging)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    v = sub.add_parser("vg", help="Visual Genome v1.2 (image_data.json, region_descriptions.json, VG_100K*/)")
    v.add_argument("--root", required=True,
                   help="directory holding image_data.json, region_descriptions.json, VG_100K*/")
    v.add_argument("--split-file", default=None, help='densecap-style {"train": [ids], "val": [...], "test": [...]}')
    v.add_argument("--val-images", type=int, default=None,
                   help="without a split file: val size (default min(5000, N/10))")
    v.add_argument("--test-images", type=int, default=None,
                   help="without a split file: test size (default min(5000, N/10))")
    v.add_argument("--min-count", type=int, default=15, help="vocabulary count threshold (paper: 15 for VG)")
    v.add_argument("--karpathy-shards", default=None,
                   help="prepared Karpathy-split shards: report VG val/test images in its train split")
    _common(v)
    k = sub.add_parser("karpathy", help="a Karpathy split file (dataset_coco.json, dataset_flickr30k.json, ...)")
    k.add_argument("--json", required=True, help="the split file")
    k.add_argument("--images-root", required=True, help="directory the file's filepath/filename are relative to")
    k.add_argument("--proposals", default=None, help='{"<image id>": [[x1, y1, x2, y2], ...]} detection boxes')
    k.add_argument("--min-count", type=int, default=5, help="vocabulary count threshold (paper: 5)")
    k.add_argument("--vg-shards", default=None, help="prepared VG shards: report train images in its val/test")
    _common(k)


def run(args) -> int:
    options = PrepareOptions(shard_bytes=args.shard_bytes, max_side=args.max_side, chunk_images=args.chunk_images,
                             verify=args.verify, max_image_bytes=args.max_image_bytes, recheck=args.recheck,
                             address=args.address, num_cpus=args.num_cpus, use_ray=not args.no_ray,
                             progress=not args.quiet)
    if args.source == "vg":
        m = prepare_vg(VGSource(args.root, split_file=args.split_file, val_images=args.val_images,
                                test_images=args.test_images, karpathy_shards=args.karpathy_shards,
                                min_count=args.min_count), args.out, options)
    else:
        m = prepare_karpathy(KarpathySource(args.json, args.images_root, proposals=args.proposals,
                                            vg_shards=args.vg_shards, min_count=args.min_count), args.out, options)
    print(summary(m))
    print(f"wrote {args.out}/manifest.json and vocab.json")
    return 0
