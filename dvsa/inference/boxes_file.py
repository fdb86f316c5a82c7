"""Boxes files for ``dvsa caption``: the shapes people have, read into boxes per image.

A boxes file is JSON in one of these shapes (boxes in pixels of the image file):

* a list of boxes, used for every image: ``[[10, 10, 60, 50], [0, 0, 30, 30]]``;
* an object keyed by image (the path as given, its absolute path, or its file name):
  ``{"photo.jpg": [[10, 10, 60, 50]], "other.png": []}``; every key must name an image given;
* COCO detection results: ``[{"image_id": 42, "bbox": [x, y, w, h], "score": 0.9, ...}, ...]``;
  ``image_id`` matches an image by its file name or by the number its file name ends in
  (``000000000042.jpg``, ``COCO_val2014_000000000042.jpg``);
* densecap's ``results.json``: ``{"results": [{"img_name": "photo.jpg", "boxes": [[x, y, w, h],
  ...], "captions": [...], "scores": [...]}]}``, ``img_name`` matching as a key does (densecap
  measures boxes on the image as it rescaled it, the copy it saves beside results.json).

A box in a list is four numbers, ``[x1, y1, x2, y2]`` (``box_format="xyxy"``, the default) or
``[x, y, width, height]`` (``"xywh"``), or a Visual Genome region object ``{"x", "y", "width",
"height", ...}``. COCO's ``bbox`` and densecap's ``boxes`` are always ``[x, y, w, h]``. Results
files (COCO, densecap) may cover more images than those given; the others are ignored, but
one that matches none of the images is an error. An image with no boxes is captioned whole.

Reading checks everything that does not need the image: JSON, shapes, four finite numbers,
positive width and height. :meth:`GivenBox.clipped` then clips a box to its image (a box
wholly outside is refused). Each problem is one :class:`DataError` line naming the file and
where in it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from dvsa.errors import DataError, first_few
from dvsa.files import load_json

BoxFormat = Literal["xyxy", "xywh"]
BOX_FORMATS: tuple[str, ...] = get_args(BoxFormat)
LAYOUT = {"xyxy": "[x1, y1, x2, y2]", "xywh": "[x, y, width, height]"}
VG_REGION_KEYS = ("x", "y", "width", "height")
_TRAILING_NUMBER = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class GivenBox:
    """One box of the file, as ``[x1, y1, x2, y2]`` (checked: finite, positive size)."""

    where: str               # its place in the file, for messages: "b.json[2]", "b.json: 'a.jpg'[0]"
    given: object            # as written
    xyxy: tuple[float, float, float, float]

    def clipped(self, width: int, height: int) -> list[float]:
        """The box clipped to a ``width x height`` image; DataError when none of it is inside."""
        x1, y1, x2, y2 = self.xyxy
        c = [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]
        if c[2] <= c[0] or c[3] <= c[1]:
            raise DataError(f"{self.where}: {_short(self.given)} lies outside the {width}x{height} image")
        return c


@dataclass
class BoxesFile:
    """A boxes file read and checked: boxes for every image, or per image key."""

    path: str
    shape: str                                           # "list" | "keyed" | "coco" | "densecap"
    every_image: list[GivenBox] = field(default_factory=list)
    by_key: dict[str, list[GivenBox]] = field(default_factory=dict)

    def boxes_for(self, image: str) -> list[GivenBox]:
        """This image's boxes ([] = caption it whole)."""
        if self.shape == "list":
            return self.every_image
        if self.shape == "coco":   # every detection of the image, whichever way its id is written
            return [b for key in dict.fromkeys(image_ids(image)) for b in self.by_key.get(key, [])]
        key = next((k for k in image_names(image) if k in self.by_key), None)
        return self.by_key[key] if key is not None else []

    def check_images(self, images: list[str]) -> None:
        """Keyed files: every key names one of ``images``; results files: at least one does."""
        if self.shape == "list":
            return
        known: set[str] = set()
        for image in images:
            known.update(image_ids(image) if self.shape == "coco" else image_names(image))
        unknown = [k for k in self.by_key if k not in known]
        if self.shape == "keyed" and unknown:
            raise DataError(f"{self.path}: key {_short(unknown[0])} names none of the images given "
                            f"({first_few(images)})")
        if self.by_key and len(unknown) == len(self.by_key):
            what = "image_id" if self.shape == "coco" else "img_name"
            raise DataError(f"{self.path}: no {what} in it matches the images given (it has "
                            f"{first_few(self.by_key)}; the images: {first_few(images)})")


def image_names(image: str) -> tuple[str, ...]:
    """The keys that name an image: its path as given, its absolute path, its file name."""
    p = Path(image)
    return image, str(p.resolve()), p.name


def image_ids(image: str) -> tuple[str, ...]:
    """The keys a COCO ``image_id`` may be for an image: its names, and the number its file
    name ends in (``COCO_val2014_000000000042.jpg`` -> ``"42"``)."""
    number = _TRAILING_NUMBER.search(Path(image).stem)
    return image_names(image) + ((str(int(number.group(1))),) if number else ())


# --------------------------------------------------------------------------- reading


def read_boxes_file(path: str, box_format: BoxFormat = "xyxy") -> BoxesFile:
    """Parse and check a boxes file (any shape of the module doc); DataError naming the place."""
    if box_format not in BOX_FORMATS:
        raise DataError(f"box format must be one of {', '.join(BOX_FORMATS)}, got {box_format!r}")
    spec = load_json(path, "no such boxes file")
    if isinstance(spec, list) and any(isinstance(d, dict) and "bbox" in d for d in spec):
        return _coco_results(path, spec)
    if isinstance(spec, list):
        return BoxesFile(path, "list", every_image=_box_list(spec, path, box_format))
    if isinstance(spec, dict) and isinstance(spec.get("results"), list) and _looks_like_densecap(spec["results"]):
        return _densecap_results(path, spec["results"])
    if isinstance(spec, dict):
        # a key is a JSON object key (a string): an image's path, shown whole, so it can be found
        return BoxesFile(path, "keyed", by_key={
            str(key): _box_list(boxes, f"{path}: {str(key)!r}", box_format) for key, boxes in spec.items()})
    raise DataError(f"{path}: expected a list of boxes, an object keyed by image, COCO detection results "
                    f"or densecap's results.json, got {type(spec).__name__}")


def parse_boxes(boxes: object, where: str, box_format: BoxFormat = "xyxy") -> list[GivenBox]:
    """One image's boxes given as data (a list of boxes in ``box_format`` or VG region objects,
    as in a boxes file), checked the same way; ``where`` names them in errors."""
    if box_format not in BOX_FORMATS:
        raise DataError(f"box format must be one of {', '.join(BOX_FORMATS)}, got {box_format!r}")
    return _box_list(boxes, where, box_format)


def _box_list(boxes: object, where: str, box_format: BoxFormat) -> list[GivenBox]:
    if not isinstance(boxes, list):
        raise DataError(f"{where}: expected a list of {LAYOUT[box_format]} boxes, got {type(boxes).__name__}")
    return [_box(b, f"{where}[{i}]", box_format) for i, b in enumerate(boxes)]


def _box(value: object, where: str, box_format: BoxFormat) -> GivenBox:
    """A list of four numbers in ``box_format``, or a VG region object (always x, y, w, h)."""
    if isinstance(value, dict):
        missing = [k for k in VG_REGION_KEYS if k not in value]
        if missing:
            raise DataError(f"{where}: a region object needs x, y, width, height; "
                            f"{', '.join(missing)} missing in {_short(value)}")
        return _from_numbers([value[k] for k in VG_REGION_KEYS], value, where, "xywh")
    return _from_numbers(value, value, where, box_format)


def _from_numbers(numbers: object, given: object, where: str, box_format: BoxFormat) -> GivenBox:
    if not (isinstance(numbers, (list, tuple)) and len(numbers) == 4 and all(_is_number(v) for v in numbers)):
        raise DataError(f"{where}: a box is four numbers {LAYOUT[box_format]}, got {_short(given)}")
    a, b, c, d = (float(v) for v in numbers)
    if box_format == "xywh":
        if c <= 0 or d <= 0:
            raise DataError(f"{where}: {_short(given)} is empty (need width > 0 and height > 0)")
        return GivenBox(where, given, (a, b, a + c, b + d))
    if c <= a or d <= b:
        raise DataError(f"{where}: {_short(given)} is empty (need x2 > x1 and y2 > y1)")
    return GivenBox(where, given, (a, b, c, d))


def _is_number(v: object) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:   # an integer beyond any float
        return False


def _coco_results(path: str, detections: list) -> BoxesFile:
    by_key: dict[str, list[GivenBox]] = {}
    for i, det in enumerate(detections):
        where = f"{path}[{i}]"
        if not (isinstance(det, dict) and "image_id" in det and "bbox" in det):
            raise DataError(f"{where}: a COCO detection is {{\"image_id\": ..., \"bbox\": [x, y, w, h], ...}}, "
                            f"got {_short(det)}")
        image_id = det["image_id"]
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            raise DataError(f"{where}: image_id must be a number or a file name, got {_short(image_id)}")
        by_key.setdefault(str(image_id), []).append(_from_numbers(det["bbox"], det["bbox"], f"{where}.bbox", "xywh"))
    return BoxesFile(path, "coco", by_key=by_key)


def _looks_like_densecap(results: list) -> bool:
    return all(isinstance(r, dict) and "img_name" in r for r in results)


def _densecap_results(path: str, results: list) -> BoxesFile:
    by_key: dict[str, list[GivenBox]] = {}
    for i, r in enumerate(results):
        where = f"{path}: results[{i}]"
        if not isinstance(r["img_name"], str):
            raise DataError(f"{where}.img_name: expected a file name, got {_short(r['img_name'])}")
        by_key.setdefault(r["img_name"], []).extend(_box_list(r.get("boxes"), f"{where}.boxes", "xywh"))
    return BoxesFile(path, "densecap", by_key=by_key)


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
