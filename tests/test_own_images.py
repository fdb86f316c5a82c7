"""dvsa.inference.own_images: the inputs of `dvsa caption` (image files and a boxes file),
validated with one-line errors naming the file, key and box; boxes clipped to the image."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from dvsa.errors import DataError
from dvsa.inference.own_images import boxes_for, check_boxes, check_keys, read_image


def test_check_boxes_clips_to_the_image_and_names_bad_boxes():
    assert check_boxes([[-5, 10, 30, 200], (1, 2, 3, 4.5)], "b.json", 100, 50) == [
        [0.0, 10.0, 30.0, 50.0], [1.0, 2.0, 3.0, 4.5]]
    assert check_boxes([], "b.json", 10, 10) == []
    for boxes, message in (
            ({"a": 1}, r"b.json: expected a list of \[x1, y1, x2, y2\] boxes, got dict"),
            ([[0, 0, 5, 5], [1, 2, 3]], r"b.json\[1\]: a box is four numbers"),
            ([[0, 0, True, 5]], r"b.json\[0\]: a box is four numbers"),
            ([[0, 0, float("nan"), 5]], r"b.json\[0\]: a box is four numbers"),
            ([[5, 0, 5, 5]], r"b.json\[0\]: \[5, 0, 5, 5\] is empty"),
            ([[120, 0, 130, 5]], r"b.json\[0\]: \[120, 0, 130, 5\] lies outside the 100x50 image")):
        with pytest.raises(DataError, match=message):
            check_boxes(boxes, "b.json", 100, 50)


def test_boxes_for_a_list_or_by_path_absolute_path_or_file_name(tmp_path):
    img = str(tmp_path / "photo.jpg")
    assert boxes_for(None, None, img, 100, 50) == []                       # no file: the whole image
    assert boxes_for([[0, 0, 10, 10]], "b.json", img, 100, 50) == [[0.0, 0.0, 10.0, 10.0]]
    for key in (img, str((tmp_path / "photo.jpg").resolve()), "photo.jpg"):
        assert boxes_for({key: [[1, 1, 2, 2]]}, "b.json", img, 100, 50) == [[1.0, 1.0, 2.0, 2.0]]
    assert boxes_for({"other.png": [[1, 1, 2, 2]]}, "b.json", img, 100, 50) == []
    with pytest.raises(DataError, match=r"b.json: 'photo.jpg'\[0\]: a box is four numbers"):
        boxes_for({"photo.jpg": [[1, 1]]}, "b.json", img, 100, 50)
    with pytest.raises(DataError, match="expected a list of boxes or an object keyed by image, got str"):
        boxes_for("photo.jpg", "b.json", img, 100, 50)


def test_check_keys_refuses_a_key_naming_no_image(tmp_path):
    images = [str(tmp_path / "a.jpg"), "rel/b.png"]
    check_keys(None, "b.json", images)
    check_keys([[0, 0, 1, 1]], "b.json", images)
    check_keys({"a.jpg": [], "rel/b.png": [], "b.png": [], str((tmp_path / "a.jpg").resolve()): []}, "b.json", images)
    with pytest.raises(DataError, match=r"b.json: key 'c.jpg' names none of the images given"):
        check_keys({"a.jpg": [], "c.jpg": []}, "b.json", images)
    with pytest.raises(DataError, match="got int"):
        check_keys(3, "b.json", images)


def test_read_image_returns_the_bytes_or_names_the_file(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, format="PNG")
    good = tmp_path / "x.png"
    good.write_bytes(buf.getvalue())
    assert read_image(str(good)) == buf.getvalue()
    with pytest.raises(DataError, match=r"gone.jpg: no such image file"):
        read_image(str(tmp_path / "gone.jpg"))
    bad = tmp_path / "cut.png"
    bad.write_bytes(buf.getvalue()[:40])
    with pytest.raises(DataError, match=r"cut.png: cannot decode image"):
        read_image(str(bad))
