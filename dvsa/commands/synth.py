"""``dvsa synth``: write a synthetic world in Visual Genome + Karpathy-split formats."""

from __future__ import annotations

from dvsa.data.synth import SynthOptions, write_world

HELP = "write a synthetic world in Visual Genome + Karpathy-split formats"


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output directory (vg/, karpathy/, truth.json)")
    parser.add_argument("--images", type=int, default=200, help="number of images (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128, help="image width in pixels (default 128)")
    parser.add_argument("--phrases-per-object", type=int, default=3)
    parser.add_argument("--false-proposals", type=int, default=0,
                        help="detector-like false positives per image among the proposals: boxes on the "
                             "background and boxes straddling two objects (default 0)")


def run(args) -> int:
    s = write_world(args.out, SynthOptions(images=args.images, image_size=args.image_size, seed=args.seed,
                                           phrases_per_object=args.phrases_per_object,
                                           false_proposals=args.false_proposals))
    print(f"wrote {s['images']} images, {s['regions']} region phrases, {s['sentences']} sentences "
          f"to {args.out} in {s['seconds']:.1f}s")
    print(f"  next: dvsa prepare vg --root {args.out}/vg --split-file {args.out}/vg/densecap_splits.json --out OUT")
    return 0
