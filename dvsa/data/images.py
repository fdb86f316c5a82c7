"""Checking and (optionally) downscaling one image's bytes for a shard.

A JPEG is verified by decoding it (at 1/8 scale through libjpeg's DCT scaling, which still
reads the whole entropy-coded stream, so truncation and corruption are caught) and stored as
the original bytes. ``verify="markers"`` checks only the header and the SOI/EOI markers (a
truncated file fails it), which runs near the speed of a file copy. Non-JPEG files and
CMYK JPEGs are re-encoded as RGB JPEG; ``max_side`` downscales once, at prepare time.
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


def _markers_ok(data: bytes) -> bool:
    """JPEG structure: starts with SOI, ends with EOI (trailing zero padding allowed)."""
    return data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def prepare_image(data: bytes, max_side: int | None = None, verify: str = "decode") -> StoredImage:
    """Verify ``data`` and return what to store; raises :class:`BadImage`.

    ``verify="decode"`` decodes every JPEG (at 1/8 scale); ``"markers"`` only parses its
    header and checks the SOI/EOI markers (catches truncation, not damage inside the stream).
    """
    if not data:
        raise BadImage("empty file")
    try:
        im = Image.open(io.BytesIO(data))
        W, H = im.size
        if W <= 0 or H <= 0:
            raise BadImage(f"bad size {W}x{H}")
        fmt, mode = im.format, im.mode
        if max_side and max(W, H) > max_side:
            s = max_side / max(W, H)
            w, h = max(1, round(W * s)), max(1, round(H * s))
            if fmt == "JPEG":
                im.draft("RGB", (w, h))
            im = im.convert("RGB").resize((w, h), Image.BILINEAR)
            return StoredImage(_encode(im), w, h, W, H, "downscaled")
        if fmt != "JPEG" or mode not in ("RGB", "L"):
            im = im.convert("RGB")
            return StoredImage(_encode(im), W, H, W, H, "reencoded")
        if verify == "markers":
            if not _markers_ok(data):
                raise BadImage("truncated JPEG (no end-of-image marker)")
        else:
            im.draft(mode, (max(1, W // 8), max(1, H // 8)))
            im.load()
        return StoredImage(data, W, H, W, H, "copied")
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(str(e) or type(e).__name__) from None
