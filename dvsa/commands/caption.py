"""``dvsa caption --checkpoint RUN_OR_PATH IMAGE... [--boxes FILE] [--box-format xyxy|xywh] [--out DIR]``

Captions your own images with a trained captioner: the whole image, or the regions given in
a boxes file. Prints every caption with its log probability (best first) and writes, per
image, the Fig. 10 picture ``<out>/<name>_captions.png``, plus ``<out>/captions.json``.

The boxes file is JSON, boxes in pixels of the image file (:mod:`dvsa.inference.boxes_file`):

* a list of boxes, used for every image: ``[[10, 10, 60, 50], [0, 0, 30, 30]]``;
* an object keyed by image (the path as given on the command line, or its file name):
  ``{"photo.jpg": [[10, 10, 60, 50]], "other.png": []}``; an image without an entry (or with
  an empty list) is captioned whole;
* COCO detection results ``[{"image_id": 42, "bbox": [x, y, w, h], ...}]`` (``image_id`` is the
  number the file name ends in, or the file name), or densecap's ``results.json``
  (``{"results": [{"img_name", "boxes": [[x, y, w, h], ...], ...}]}``).

A box in a list is ``[x1, y1, x2, y2]``, or ``[x, y, width, height]`` with ``--box-format
xywh``, or a Visual Genome region ``{"x", "y", "width", "height"}``. The boxes file and every
image are checked before the model is loaded: a missing or undecodable file, an image over the
pixel cap (``--max-megapixels``), or a bad box is a one-line error naming the file (and the key
and box index). Images are decoded at reduced size (a JPEG through its DCT scaling), as the
training pipeline's ``pil`` decoder reads them; :mod:`dvsa.inference.own_images`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dvsa import tracking
from dvsa.inference.boxes_file import BOX_FORMATS
from dvsa.inference.captioning import BoxCaptioner
from dvsa.inference.own_images import MAX_MEGAPIXELS, caption_images, picture, read_inputs
from dvsa.viz import draw_region_captions

HELP = "caption your own images (whole or given boxes) with a trained model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="captioner checkpoint dir, Ray Train run dir, MLflow run id, or MLflow model URI "
                             "(runs:/<run id>/model, models:/<name>/<version|latest>, models:/<name>@<alias>)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (jpg, png, ...)")
    parser.add_argument("--boxes", default=None,
                        help="JSON boxes file: a list, an object keyed by image, COCO detection results "
                             "or densecap's results.json (see `dvsa caption` doc)")
    parser.add_argument("--box-format", choices=BOX_FORMATS, default="xyxy",
                        help="how a box of four numbers in a list reads: [x1, y1, x2, y2] (xyxy, default) "
                             "or [x, y, width, height] (xywh); COCO and densecap files are always xywh")
    parser.add_argument("--max-megapixels", type=_positive, default=MAX_MEGAPIXELS,
                        help=f"refuse an image larger than this even at its best reduced-size decode "
                             f"(a JPEG: 1/8 scale; other formats: full size); default {MAX_MEGAPIXELS:g}")
    parser.add_argument("--out", default="runs/captions", help="where the pictures go (default: runs/captions)")
    parser.add_argument("--decode", choices=("beam", "greedy", "sample"), default="beam")
    parser.add_argument("--beam-size", type=int, default=None, help="default: the checkpoint's caption.beam_size")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store holding the run or model (for a run id or a runs:/, models:/ URI)")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:   # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    uri = args.tracking_uri or tracking.tracking_uri(Path("runs").resolve())
    inputs = read_inputs(args.images, args.boxes, args.box_format, args.max_megapixels)   # before the model
    captioner = BoxCaptioner.from_checkpoint(args.checkpoint, uri, decode=args.decode, beam_size=args.beam_size)
    results = caption_images(captioner, inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    for item, r in zip(inputs, results):
        stem = Path(r["image"]).stem
        seen[stem] = seen.get(stem, 0) + 1
        name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
        image, boxes = picture(item.image, [g["box"] for g in r["regions"]])
        r["picture"] = str(draw_region_captions(image, boxes, [g["caption"] for g in r["regions"]],
                                                [g["logprob"] for g in r["regions"]], out / f"{name}_captions.png",
                                                title=Path(r["image"]).name))
        print(f"{r['image']} ({r['width']}x{r['height']}):")
        for g in sorted(r["regions"], key=lambda g: -g["logprob"]):
            box = ", ".join(f"{v:.0f}" for v in g["box"])
            print(f"  {g['logprob']:8.3f}  {g['caption'] or '(empty)'}   [{box}]")
        print(f"  picture: {r['picture']}")
    (out / "captions.json").write_text(json.dumps(results, indent=2))
    print(f"written: {out / 'captions.json'}")
    return 0
