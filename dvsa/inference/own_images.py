"""Captioning your own images: image files, and a boxes file naming the regions to describe.

The boxes file is JSON, boxes as ``[x1, y1, x2, y2]`` in pixels of the image file:

* a list of boxes, used for every image: ``[[10, 10, 60, 50], [0, 0, 30, 30]]``;
* or an object keyed by image (the path as given, its absolute path, or its file name):
  ``{"photo.jpg": [[10, 10, 60, 50]], "other.png": []}``; an image without an entry (or with
  an empty list) is captioned whole.

A missing or undecodable file, or a bad box, is a one-line :class:`DataError` naming the file
(and the key and box index).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

from PIL import Image

from dvsa.errors import DataError
from dvsa.files import load_json
from dvsa.inference.captioning import BoxCaptioner
from dvsa.ingest.decode import CorruptImage

# --------------------------------------------------------------------------- inputs


def read_image(path: str) -> bytes:
    """The file's bytes, verified to decode; DataError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such image file")
    data = p.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()   # a truncated file opens fine and fails only when decoded
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    return data


def load_boxes_file(path: str) -> object:
    return load_json(path, "no such boxes file")


def check_boxes(boxes: object, where: str, width: int, height: int) -> list[list[float]]:
    """Validated boxes clipped to the image; DataError naming ``where`` and the box index."""
    if not isinstance(boxes, list):
        raise DataError(f"{where}: expected a list of [x1, y1, x2, y2] boxes, got {type(boxes).__name__}")
    out = []
    for i, b in enumerate(boxes):
        if (not isinstance(b, (list, tuple)) or len(b) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)):
            raise DataError(f"{where}[{i}]: a box is four numbers [x1, y1, x2, y2], got {b!r}")
        x1, y1, x2, y2 = (float(v) for v in b)
        if x2 <= x1 or y2 <= y1:
            raise DataError(f"{where}[{i}]: {b!r} is empty (need x2 > x1 and y2 > y1)")
        c = [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]
        if c[2] <= c[0] or c[3] <= c[1]:
            raise DataError(f"{where}[{i}]: {b!r} lies outside the {width}x{height} image")
        out.append(c)
    return out


def boxes_for(spec: object, boxes_file: Optional[str], image: str, width: int, height: int) -> list[list[float]]:
    """The boxes the file gives this image ([] = the whole image)."""
    if spec is None:
        return []
    if isinstance(spec, list):
        return check_boxes(spec, str(boxes_file), width, height)
    if not isinstance(spec, dict):
        raise DataError(f"{boxes_file}: expected a list of boxes or an object keyed by image, "
                        f"got {type(spec).__name__}")
    for key in (image, str(Path(image).resolve()), Path(image).name):
        if key in spec:
            return check_boxes(spec[key], f"{boxes_file}: {key!r}", width, height)
    return []


def check_keys(spec: object, boxes_file: str, images: list[str]) -> None:
    if spec is None or isinstance(spec, list):
        return
    if not isinstance(spec, dict):
        raise DataError(f"{boxes_file}: expected a list of boxes or an object keyed by image, "
                        f"got {type(spec).__name__}")
    names = set(images) | {Path(i).name for i in images} | {str(Path(i).resolve()) for i in images}
    unknown = [k for k in spec if k not in names]
    if unknown:
        raise DataError(f"{boxes_file}: key {unknown[0]!r} names none of the images given "
                        f"({', '.join(images)})")


# --------------------------------------------------------------------------- captioning


def caption_images(captioner: BoxCaptioner, images: list[str], boxes_file: Optional[str] = None) -> list[dict]:
    """``[{image, width, height, regions: [{box, caption, logprob}] (best first)}]``."""
    spec = load_boxes_file(boxes_file) if boxes_file else None
    check_keys(spec, str(boxes_file), images)
    results = []
    for path in images:
        data = read_image(path)
        try:
            img, (w, h) = captioner.prepare_image(data)
        except CorruptImage as e:
            raise DataError(f"{path}: cannot decode image ({e})") from None
        boxes = boxes_for(spec, boxes_file, path, w, h) or [[0.0, 0.0, float(w), float(h)]]
        (described,) = captioner.describe([img], [captioner.to_frame(boxes, w, h)])
        regions = [{"box": b, "caption": c, "logprob": lp} for b, (c, lp) in zip(boxes, described)]
        results.append({"image": path, "width": w, "height": h, "regions": regions})
    return results
