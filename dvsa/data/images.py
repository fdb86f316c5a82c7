"""Checking and (optionally) downscaling one image's bytes for a shard.

A JPEG is verified by decoding it (at 1/8 scale through libjpeg's DCT scaling, which still
reads the whole entropy-coded stream, so truncation and corruption are caught) and stored as
the original bytes. ``verify="markers"`` checks only the header and the SOI/EOI markers (a
truncated file fails it) and reads the frame size from the SOF segment itself (PIL's
``Image.open`` costs about as much as copying the bytes), so it runs near the speed of a file
copy. Non-JPEG files and CMYK JPEGs are re-encoded as RGB JPEG; ``max_side`` downscales once,
at prepare time.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

JPEG_QUALITY = 90


class BadImage(Exception):
    """The bytes are not a decodable image."""


@dataclass
class StoredImage:
    data: bytes
    width: int          # of the stored JPEG
    height: int
    orig_width: int     # of the input file
    orig_height: int
    action: str         # "copied" | "reencoded" | "downscaled"

    @property
    def scale(self) -> tuple[float, float]:
        return self.width / self.orig_width, self.height / self.orig_height


def _encode(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def markers_ok(data: bytes) -> bool:
    """JPEG structure: starts with SOI, ends with EOI (trailing zero padding allowed)."""
    return data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


# start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic)
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))   # TEM, RSTn: no length field


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from a JPEG's SOF segment, or None when ``data`` is not
    a JPEG whose header walks cleanly to one (the caller then asks PIL)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:               # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):       # EOI or start of scan before any frame header
            return None
        seg = (data[i + 2] << 8) | data[i + 3]
        if marker in _SOF:
            if seg < 8 or i + 2 + seg > n:
                return None
            h = (data[i + 5] << 8) | data[i + 6]
            w = (data[i + 7] << 8) | data[i + 8]
            return w, h, data[i + 9]
        i += 2 + seg
    return None


def _fast_copy(data: bytes, max_side: int | None) -> StoredImage | None:
    """The ``markers`` path without PIL: an RGB or greyscale JPEG stored as is; None when
    the image needs PIL (not such a JPEG, downscaling, an odd header)."""
    frame = jpeg_frame(data)
    if frame is None:
        return None
    W, H, comps = frame
    if W <= 0 or H <= 0 or comps not in (1, 3) or (max_side and max(W, H) > max_side):
        return None
    if not markers_ok(data):
        raise BadImage("truncated JPEG (no end-of-image marker)")
    return StoredImage(data, W, H, W, H, "copied")


def prepare_image(data: bytes, max_side: int | None = None, verify: str = "decode") -> StoredImage:
    """Verify ``data`` and return what to store; raises :class:`BadImage`.

    ``verify="decode"`` decodes every JPEG (at 1/8 scale); ``"markers"`` only parses its
    header and checks the SOI/EOI markers (catches truncation, not damage inside the stream).
    """
    if not data:
        raise BadImage("empty file")
    if verify == "markers":
        fast = _fast_copy(data, max_side)
        if fast is not None:
            return fast
    try:
        im: Image.Image = Image.open(io.BytesIO(data))
        W, H = im.size
        if W <= 0 or H <= 0:
            raise BadImage(f"bad size {W}x{H}")
        fmt, mode = im.format, im.mode
        if max_side and max(W, H) > max_side:
            s = max_side / max(W, H)
            w, h = max(1, round(W * s)), max(1, round(H * s))
            if fmt == "JPEG":
                im.draft("RGB", (w, h))
            im = im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
            return StoredImage(_encode(im), w, h, W, H, "downscaled")
        if fmt != "JPEG" or mode not in ("RGB", "L"):
            im = im.convert("RGB")
            return StoredImage(_encode(im), W, H, W, H, "reencoded")
        if verify == "markers":
            if not markers_ok(data):
                raise BadImage("truncated JPEG (no end-of-image marker)")
        else:
            im.draft(mode, (max(1, W // 8), max(1, H // 8)))
            im.load()
        return StoredImage(data, W, H, W, H, "copied")
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(str(e) or type(e).__name__) from None
