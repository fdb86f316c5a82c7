"""``dvsa caption --checkpoint RUN_OR_PATH IMAGE... [--boxes boxes.json] [--out DIR]``

Captions your own images with a trained captioner: the whole image, or the regions given in
a boxes file. Prints every caption with its log probability (best first) and writes, per
image, the Fig. 10 picture ``<out>/<name>_captions.png``, plus ``<out>/captions.json``.

The boxes file is JSON, boxes as ``[x1, y1, x2, y2]`` in pixels of the image file:

* a list of boxes, used for every image: ``[[10, 10, 60, 50], [0, 0, 30, 30]]``;
* or an object keyed by image (the path as given on the command line, or its file name):
  ``{"photo.jpg": [[10, 10, 60, 50]], "other.png": []}``; an image without an entry (or with
  an empty list) is captioned whole.

Images are read as the training pipeline reads them (any format PIL decodes, stretched to
``data.image_size``); a missing or undecodable file, or a bad box, is a one-line error naming
the file (and the key and box index). The reading and checking is
:mod:`dvsa.inference.own_images`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dvsa import tracking
from dvsa.inference.captioning import BoxCaptioner
from dvsa.inference.own_images import caption_images, check_keys, load_boxes_file, read_image
from dvsa.viz import draw_region_captions

HELP = "caption your own images (whole or given boxes) with a trained model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="captioner checkpoint dir, Ray Train run dir, or MLflow run id")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (jpg, png, ...)")
    parser.add_argument("--boxes", default=None, help="JSON boxes file (see `dvsa caption` doc)")
    parser.add_argument("--out", default="runs/captions", help="where the pictures go (default: runs/captions)")
    parser.add_argument("--decode", choices=("beam", "greedy", "sample"), default="beam")
    parser.add_argument("--beam-size", type=int, default=None, help="default: the checkpoint's caption.beam_size")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store holding the run (for a run id)")


def run(args: argparse.Namespace) -> int:
    import io

    from PIL import Image

    uri = args.tracking_uri or tracking.tracking_uri(Path("runs").resolve())
    for path in args.images:   # fail before loading the model
        read_image(path)
    if args.boxes:
        check_keys(load_boxes_file(args.boxes), args.boxes, args.images)
    captioner = BoxCaptioner.from_checkpoint(args.checkpoint, uri, decode=args.decode, beam_size=args.beam_size)
    results = caption_images(captioner, args.images, args.boxes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    for r in results:
        stem = Path(r["image"]).stem
        seen[stem] = seen.get(stem, 0) + 1
        name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
        with Image.open(io.BytesIO(Path(r["image"]).read_bytes())) as im:
            picture = draw_region_captions(im.convert("RGB"), [g["box"] for g in r["regions"]],
                                           [g["caption"] for g in r["regions"]],
                                           [g["logprob"] for g in r["regions"]], out / f"{name}_captions.png",
                                           title=Path(r["image"]).name)
        r["picture"] = str(picture)
        print(f"{r['image']} ({r['width']}x{r['height']}):")
        for g in sorted(r["regions"], key=lambda g: -g["logprob"]):
            box = ", ".join(f"{v:.0f}" for v in g["box"])
            print(f"  {g['logprob']:8.3f}  {g['caption'] or '(empty)'}   [{box}]")
        print(f"  picture: {picture}")
    (out / "captions.json").write_text(json.dumps(results, indent=2))
    print(f"written: {out / 'captions.json'}")
    return 0
