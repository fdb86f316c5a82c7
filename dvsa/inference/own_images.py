"""Your own images for ``dvsa caption``: image files decoded at reduced size under a pixel cap,
with the boxes of a boxes file (:mod:`dvsa.inference.boxes_file`) clipped to each.

Decoding a photograph whole is what costs: a 10000 x 10000 JPEG is 300 MB of pixels (and far
more once drawn). So an image is never decoded larger than needed. A JPEG decodes at 1/2, 1/4
or 1/8 of its size through libjpeg's DCT scaling (PIL's ``Image.draft``: the smallest scale that
keeps the size asked for), so the model's input is made exactly as training ingest's ``pil``
decoder makes it (scaled to keep both sides >= ``data.image_size``, then stretched to the
square), and the picture is decoded near :data:`PICTURE_SIDE` pixels. Other formats (PNG, ...)
cannot decode at reduced size.

The pixel cap: an image whose header says it would still be more than ``max_megapixels``
(:data:`MAX_MEGAPIXELS` unless told) at the best reduction its format allows (1/8 per side for a
JPEG, none otherwise) is refused before any pixel is decoded, in one line naming the file, its
size and the cap. Boxes are in pixels of the image file (its header size) whatever size it is
decoded at.
"""

from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
from PIL import Image, JpegImagePlugin

from dvsa.errors import DataError
from dvsa.inference.boxes_file import BoxFormat, read_boxes_file

if TYPE_CHECKING:
    from dvsa.inference.captioning import BoxCaptioner

#: refuse an image larger than this, in megapixels, at its best reduced-size decode
#: (``dvsa caption --max-megapixels``); 50 MP of RGB is 150 MB
MAX_MEGAPIXELS = 50.0
#: the picture of an image's captions shows it at most this many pixels on its longer side
PICTURE_SIDE = 1024
JPEG_BEST_REDUCTION = 8            # libjpeg's DCT scaling: 1/2, 1/4, 1/8
_JPEG_MAGIC = b"\xff\xd8\xff"
_PIL_PIXELS = re.compile(r"Image size \((\d+) pixels\)")


# --------------------------------------------------------------------------- image files


@dataclass(frozen=True)
class ImageFile:
    """An image file whose header has been read (and checked against the cap)."""

    path: str
    format: str
    width: int               # of the file: boxes are in these pixels
    height: int
    max_megapixels: float = MAX_MEGAPIXELS

    def decode(self, width: int, height: int) -> Image.Image:
        """RGB, a JPEG at the smallest DCT scale that keeps both sides >= ``width x height``,
        any other format whole."""
        return decode_reduced(self.path, (width, height), self.max_megapixels)


def read_header(path: str, max_megapixels: float = MAX_MEGAPIXELS) -> ImageFile:
    """The file's format and size, checked against the cap; nothing decoded."""
    with _checked_open(path, max_megapixels) as im:
        return ImageFile(path, str(im.format), im.width, im.height, max_megapixels)


def open_image(path: str, max_megapixels: float = MAX_MEGAPIXELS) -> ImageFile:
    """The file checked: it exists, its header is within the cap, and it decodes (at the
    picture's size, the largest ``dvsa caption`` asks for). DataError naming the file otherwise."""
    image = read_header(path, max_megapixels)
    image.decode(*picture_size(image))
    return image


def decode_reduced(path: str, size: tuple[int, int], max_megapixels: float = MAX_MEGAPIXELS) -> Image.Image:
    """RGB; a JPEG decoded at the smallest DCT scale that keeps both sides >= ``size``. The
    cap is checked from the header before anything is decoded."""
    with _checked_open(path, max_megapixels) as im:
        if im.format == "JPEG":
            im.draft("RGB", size)
        return im.convert("RGB")   # decodes now: a truncated file fails here


@contextmanager
def _checked_open(path: str, max_megapixels: float) -> Iterator[Image.Image]:
    """The image opened lazily (header only) and within the cap; whatever PIL raises, there
    or in the caller's decode, becomes a DataError naming the file."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such image file")
    try:
        with _open_lazily(path) as im:
            check_pixel_cap(path, str(im.format), im.width, im.height, max_megapixels)
            yield im
    except DataError:
        raise
    except Image.DecompressionBombError as e:   # PIL's own limit, at open (formats other than JPEG)
        raise DataError(_bomb_message(path, e, max_megapixels)) from None
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def _open_lazily(path: str) -> Image.Image:
    """PIL's lazy open (the header only). A JPEG is opened by its own plugin, past the
    decompression-bomb check of ``Image.open``: it decodes at reduced size, and the pixel cap
    here applies to that size instead."""
    with open(path, "rb") as f:
        magic = f.read(len(_JPEG_MAGIC))
    if magic == _JPEG_MAGIC:
        return JpegImagePlugin.JpegImageFile(path)
    with warnings.catch_warnings():   # between PIL's warning and error sizes: the cap decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def check_pixel_cap(path: str, fmt: str, width: int, height: int, max_megapixels: float) -> None:
    """DataError when the image is over ``max_megapixels`` even at its best reduced-size decode."""
    reduction = JPEG_BEST_REDUCTION if fmt == "JPEG" else 1
    least = math.ceil(width / reduction) * math.ceil(height / reduction)
    if least <= max_megapixels * 1e6:
        return
    if reduction > 1:
        what = f"a {width}x{height} JPEG decodes to {least / 1e6:.1f} megapixels even at 1/{reduction} scale"
    else:
        what = f"a {width}x{height} {fmt} image is {least / 1e6:.1f} megapixels (only JPEGs decode at reduced size)"
    raise DataError(f"{path}: {what}, over the cap of {max_megapixels:g} megapixels "
                    f"(dvsa caption --max-megapixels)")


def _bomb_message(path: str, e: Exception, max_megapixels: float) -> str:
    found = _PIL_PIXELS.search(str(e))
    size = f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "too large"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
    return (f"{path}: {size}, refused before decoding: over PIL's decompression-bomb limit of {limit:.0f} "
            f"megapixels (and the cap of {max_megapixels:g}, dvsa caption --max-megapixels)")


def model_input(image: ImageFile, size: int) -> np.ndarray:
    """uint8 ``[3, size, size]``, as training ingest's ``pil`` decoder makes it."""
    rgb = image.decode(size, size)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


def picture_size(image: ImageFile) -> tuple[int, int]:
    """The image's size scaled so its longer side is at most :data:`PICTURE_SIDE`."""
    scale = min(1.0, PICTURE_SIDE / max(image.width, image.height))
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def picture(image: ImageFile, boxes: list[list[float]]) -> tuple[Image.Image, list[list[float]]]:
    """The image to draw (longer side at most :data:`PICTURE_SIDE`) and ``boxes`` (pixels of
    the file) mapped onto it."""
    width, height = picture_size(image)
    rgb = image.decode(width, height)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    sx, sy = width / image.width, height / image.height
    return rgb, [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in boxes]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ImageRegions:
    """An image to caption and its boxes (``[x1, y1, x2, y2]`` in pixels of the file, clipped
    to it; ``[]``: the whole image)."""

    image: ImageFile
    boxes: list[list[float]]


def read_inputs(images: list[str], boxes_file: Optional[str] = None, box_format: BoxFormat = "xyxy",
                max_megapixels: float = MAX_MEGAPIXELS) -> list[ImageRegions]:
    """Every image and box of a ``dvsa caption`` call checked, no model needed: the boxes file
    read (any shape :mod:`dvsa.inference.boxes_file` accepts), every image opened under the cap
    and decoded at reduced size, every box clipped to its image. DataError naming the file."""
    boxes = read_boxes_file(boxes_file, box_format) if boxes_file else None
    files = [open_image(path, max_megapixels) for path in images]
    if boxes is None:
        return [ImageRegions(f, []) for f in files]
    boxes.check_images(images)
    return [ImageRegions(f, [b.clipped(f.width, f.height) for b in boxes.boxes_for(f.path)]) for f in files]


# --------------------------------------------------------------------------- captioning


def caption_images(captioner: BoxCaptioner, inputs: list[ImageRegions]) -> list[dict]:
    """``[{image, width, height, regions: [{box, caption, logprob}]}]``, one per input, boxes in
    pixels of the file (the whole image when none were given)."""
    results = []
    for item in inputs:
        w, h = item.image.width, item.image.height
        boxes = item.boxes or [[0.0, 0.0, float(w), float(h)]]
        pixels = model_input(item.image, captioner.image_size)
        (described,) = captioner.describe([pixels], [captioner.to_frame(boxes, w, h)])
        regions = [{"box": b, "caption": c, "logprob": lp} for b, (c, lp) in zip(boxes, described)]
        results.append({"image": item.image.path, "width": w, "height": h, "regions": regions})
    return results
