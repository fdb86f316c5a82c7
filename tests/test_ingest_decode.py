"""dvsa.ingest.decode: JPEG bytes -> uint8 [3, S, S] with both decoders, equal (to one grey
level) to PIL's own full-size decode + bilinear resize of the same image; boxes mapped into
that frame; unreadable bytes raise CorruptImage (which the ingest counts and skips)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dvsa.ingest.decode import CorruptImage, decode_resize, scale_boxes

DECODERS = ("pil", "torchvision")


def _smooth_image(w: int, h: int) -> np.ndarray:
    """HWC uint8: red ramps left to right, green top to bottom, blue a slow wave."""
    x = np.linspace(0.0, 1.0, w)[None, :]
    y = np.linspace(0.0, 1.0, h)[:, None]
    ones = np.ones((h, w))
    rgb = np.stack([255 * x * ones, 255 * y * ones, 128 + 100 * np.sin(6 * x) * np.cos(4 * y)], axis=-1)
    return rgb.astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _pil_reference(data: bytes, size: int) -> np.ndarray:
    """PIL's own: full-size decode, bilinear resize to size x size, CHW."""
    with Image.open(io.BytesIO(data)) as im:
        ref = im.convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(ref).transpose(2, 0, 1).astype(np.int16)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("w,h,size", [(320, 240, 64),    # PIL drafts at 1/2 scale (160x120)
                                      (200, 90, 48),     # wide: stretched, not cropped
                                      (40, 30, 64)])     # smaller than S: upscaled
def test_decode_resize_equals_pil_full_decode_and_resize(decoder, w, h, size):
    jpg = _encode(_smooth_image(w, h))
    img, (width, height) = decode_resize(jpg, size, decoder)
    assert img.dtype == np.uint8 and img.shape == (3, size, size)
    assert (width, height) == (w, h)                 # the stored JPEG's size, not the draft's
    diff = np.abs(img.astype(np.int16) - _pil_reference(jpg, size))
    assert diff.max() <= 2 and diff.mean() < 0.5, (decoder, diff.max(), diff.mean())


def test_pil_decoder_reads_other_formats_as_the_caption_command_feeds_them():
    png = _encode(_smooth_image(50, 70), "PNG")
    img, (w, h) = decode_resize(png, 32, "pil")
    assert (w, h) == (50, 70)
    np.testing.assert_array_equal(img.astype(np.int16), _pil_reference(png, 32))   # lossless: exact


def test_size_already_right_is_the_decoded_image_itself():
    arr = _smooth_image(32, 32)
    jpg = _encode(arr)
    with Image.open(io.BytesIO(jpg)) as im:
        decoded = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    for decoder in DECODERS:
        img, _ = decode_resize(jpg, 32, decoder)
        assert np.abs(img.astype(np.int16) - decoded.astype(np.int16)).max() <= 1, decoder


@pytest.mark.parametrize("decoder", DECODERS)
def test_unreadable_bytes_raise_corrupt_image(decoder):
    jpg = _encode(_smooth_image(64, 48))
    for bad in (jpg[: len(jpg) // 2], jpg[:200], jpg[:-2], b"not an image at all", b""):
        with pytest.raises(CorruptImage):
            decode_resize(bad, 32, decoder)
    assert issubclass(CorruptImage, ValueError)


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="unknown JPEG decoder 'cv2'"):
        decode_resize(_encode(_smooth_image(8, 8)), 8, "cv2")


def test_scale_boxes_known_values():
    # 200 x 100 image -> 50 x 50: x * 0.25, y * 0.5, clipped to [0, 50]
    out = scale_boxes([[0, 0, 200, 100], [50, 25, 150, 75], [-10, -5, 300, 120], [190, 90, 210, 110]],
                      200, 100, 50)
    assert out.dtype == np.float32 and out.shape == (4, 4)
    np.testing.assert_array_equal(out, [[0, 0, 50, 50], [12.5, 12.5, 37.5, 37.5], [0, 0, 50, 50],
                                        [47.5, 45, 50, 50]])
    assert scale_boxes([], 200, 100, 50).shape == (0, 4)
    np.testing.assert_array_equal(scale_boxes([1, 2, 3, 4], 10, 10, 10), [[1, 2, 3, 4]])   # one flat box


def test_boxes_land_on_the_pixels_they_name():
    """A white rectangle at box b of a 300 x 150 image is white inside scale_boxes(b) of the
    decoded 60 x 60 image and black outside it."""
    arr = np.zeros((150, 300, 3), dtype=np.uint8)
    arr[30:120, 150:270] = 255                        # box [150, 30, 270, 120]
    jpg = _encode(arr)
    (x1, y1, x2, y2), = scale_boxes([[150, 30, 270, 120]], 300, 150, 60).tolist()
    assert (x1, y1, x2, y2) == (30.0, 12.0, 54.0, 48.0)
    for decoder in DECODERS:
        img, _ = decode_resize(jpg, 60, decoder)
        assert img[:, 14:46, 32:52].min() > 200, decoder           # inside, a pixel from the edge
        assert img[:, :, :28].max() < 40 and img[:, :10].max() < 40 and img[:, 50:].max() < 40, decoder


def test_decode_into_a_given_row_gives_the_same_pixels():
    """``out=`` (the batch builder decodes into its batch's rows): the same image, written there."""
    jpg = _encode(_smooth_image(120, 80))
    batch = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    for decoder in DECODERS:
        img, size = decode_resize(jpg, 32, decoder)
        into, size2 = decode_resize(jpg, 32, decoder, out=batch[1])
        assert into is batch[1] or np.shares_memory(into, batch), decoder
        np.testing.assert_array_equal(batch[1], img)
        assert size == size2 == (120, 80) and not batch[0].any()
