"""JPEG bytes -> uint8 ``[3, S, S]`` at reduced cost, and boxes mapped into that frame.

Two decoders, both producing the same geometry (the whole image stretched to S x S):

- ``"pil"``: PIL with ``Image.draft("RGB", (S, S))``: libjpeg decodes at 1/2, 1/4 or 1/8 scale
  (the smallest that keeps both sides >= S) in its IDCT, so a 640x480 JPEG headed for 224x224
  is decoded at 320x240, then resized with a bilinear filter.
- ``"torchvision"``: ``torchvision.io.decode_jpeg`` at full size, then
  ``torchvision.transforms.v2.functional.resize`` (antialiased bilinear).
- ``"gpu"``: the same decode and resize, but of a whole batch on the train worker's device
  (:func:`decode_jpeg_batch`; nvJPEG on CUDA): Ray Data only reads the JPEG's header
  (:func:`jpeg_size`) and passes its bytes on. Single images (inference, ``dvsa features``)
  decode as ``"torchvision"`` on the CPU.

``benchmarks/ingest.py`` measures both; the default (``data.jpeg_decoder``) is the faster.
Boxes are given in pixels of the stored JPEG (its header size, not a decoded draft size).
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: Ray Data decode tasks of the pil path never need it
    import torch

log = logging.getLogger(__name__)

JpegDecoder = Literal["pil", "torchvision", "gpu"]


class CorruptImage(ValueError):
    """The JPEG bytes could not be decoded (truncated, corrupt, empty, not an image)."""


def decode_resize(jpg: bytes, size: int, decoder: JpegDecoder = "pil",
                  out: "np.ndarray | None" = None) -> tuple[np.ndarray, tuple[int, int]]:
    """``(uint8[3, size, size], (width, height) of the stored image)``; raises CorruptImage.
    ``out``: a C-contiguous uint8 ``[3, size, size]`` array (e.g. a row of a batch) that receives
    the image and is returned, instead of a new array (the same pixels, one copy fewer)."""
    if not jpg:
        raise CorruptImage("empty image bytes")
    if decoder == "pil":
        return _decode_pil(jpg, size, out)
    if decoder in ("torchvision", "gpu"):
        img, wh = _decode_torchvision(jpg, size)
        if out is not None:
            out[...] = img
            img = out
        return img, wh
    raise ValueError(f"unknown JPEG decoder {decoder!r} (allowed: 'pil', 'torchvision', 'gpu')")


def jpeg_size(jpg: bytes) -> tuple[int, int]:
    """``(width, height)`` from a JPEG's header, without decoding it (the ``gpu`` decoder's
    ingest side); raises CorruptImage for anything the batch decoder could not take: not a
    baseline/progressive RGB or greyscale JPEG, or truncated (no end-of-image marker)."""
    from dvsa.data.images import jpeg_frame, markers_ok

    if not jpg:
        raise CorruptImage("empty image bytes")
    frame = jpeg_frame(jpg)
    if frame is None:
        raise CorruptImage("not a JPEG whose header names its frame size")
    width, height, components = frame
    if width <= 0 or height <= 0 or components not in (1, 3):
        raise CorruptImage(f"unsupported JPEG frame {width}x{height} with {components} components")
    if not markers_ok(jpg):
        raise CorruptImage("truncated JPEG (no end-of-image marker)")
    return width, height


def decode_jpeg_batch(jpegs: Sequence[bytes], size: int, device: "torch.device | str") -> "torch.Tensor":
    """JPEG bytes -> uint8 ``[B, 3, size, size]`` on ``device``: one batched
    ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA), then an antialiased bilinear resize per
    image, as the ``torchvision`` decoder does on the CPU. An image that still fails to decode
    (damage inside the entropy-coded stream, which the header check cannot see) becomes black
    and is logged."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    try:
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = [_decode_or_none(d, device) for d in data]
    out = torch.zeros((len(data), 3, size, size), dtype=torch.uint8, device=device)
    for i, chw in enumerate(decoded):
        if chw is not None:
            out[i] = chw if chw.shape[1:] == (size, size) else TF.resize(chw, [size, size], antialias=True)
    return out


def _decode_or_none(data: "torch.Tensor", device) -> "torch.Tensor | None":
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        log.warning("decode_jpeg_batch: an image of the batch does not decode (%s); it is black", e)
        return None


def _decode_pil(jpg: bytes, size: int, out: "np.ndarray | None" = None) -> tuple[np.ndarray, tuple[int, int]]:
    from PIL import Image

    try:
        # from bytes in memory: no file to close (closing an image releases its pixels)
        im = Image.open(io.BytesIO(jpg))
        width, height = im.size
        if im.format == "JPEG":
            im.draft("RGB", (size, size))           # reduced-size IDCT; keeps both sides >= size
        im.load()                 # decode now: a truncated JPEG opens fine and fails only here
        rgb = im if im.mode == "RGB" else im.convert("RGB")     # convert("RGB") of RGB copies it
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise CorruptImage(f"{type(e).__name__}: {e}") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    hwc = np.asarray(rgb, dtype=np.uint8)            # [S, S, 3]
    if out is None:
        return np.ascontiguousarray(hwc.transpose(2, 0, 1)), (width, height)
    out[...] = hwc.transpose(2, 0, 1)
    return out, (width, height)


def _decode_torchvision(jpg: bytes, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    data = torch.frombuffer(bytearray(jpg), dtype=torch.uint8)
    try:
        chw = decode_jpeg(data, mode=ImageReadMode.RGB)   # [3, H, W]
    except Exception as e:  # RuntimeError from libjpeg
        raise CorruptImage(f"{type(e).__name__}: {e}") from None
    height, width = int(chw.shape[1]), int(chw.shape[2])
    if (height, width) != (size, size):
        chw = TF.resize(chw, [size, size], antialias=True)
    return chw.numpy(), (width, height)


def scale_boxes(boxes, width: int, height: int, size: int) -> np.ndarray:
    """Boxes ``[x1, y1, x2, y2]`` in pixels of a ``width x height`` image -> pixels of the
    ``size x size`` resized image (x scaled by size/width, y by size/height), clipped to it."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([size / width, size / height, size / width, size / height])
    return np.clip(b * scale, 0.0, float(size)).astype(np.float32)
