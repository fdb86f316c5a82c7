"""dvsa.inference.own_images and boxes_file: the inputs of `dvsa caption` (image files and a
boxes file), validated with one-line errors naming the file, key and box; boxes clipped to the
image. (The hostile cases, every boxes-file shape and the pixel cap: test_hostile_inference.py.)"""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from dvsa.errors import DataError
from dvsa.inference.boxes_file import read_boxes_file
from dvsa.inference.own_images import open_image, read_inputs


def _boxes_file(tmp_path, content) -> str:
    p = tmp_path / "b.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(p)


def _clipped(tmp_path, content, width=100, height=50, image="photo.jpg"):
    bf = read_boxes_file(_boxes_file(tmp_path, content))
    return [b.clipped(width, height) for b in bf.boxes_for(image)]


def test_boxes_are_clipped_to_the_image_and_bad_boxes_named(tmp_path):
    assert _clipped(tmp_path, [[-5, 10, 30, 200], [1, 2, 3, 4.5]]) == [[0.0, 10.0, 30.0, 50.0], [1.0, 2.0, 3.0, 4.5]]
    assert _clipped(tmp_path, []) == []
    for boxes, message in (
            ({"photo.jpg": 1}, r"b.json: 'photo.jpg': expected a list of \[x1, y1, x2, y2\] boxes, got int"),
            ([[0, 0, 5, 5], [1, 2, 3]], r"b.json\[1\]: a box is four numbers \[x1, y1, x2, y2\], got \[1, 2, 3\]"),
            ([[0, 0, True, 5]], r"b.json\[0\]: a box is four numbers"),
            ("[[0, 0, NaN, 5]]", r"b.json\[0\]: a box is four numbers"),
            ([[5, 0, 5, 5]], r"b.json\[0\]: \[5, 0, 5, 5\] is empty \(need x2 > x1 and y2 > y1\)"),
            ([[120, 0, 130, 5]], r"b.json\[0\]: \[120, 0, 130, 5\] lies outside the 100x50 image")):
        with pytest.raises(DataError, match=message):
            _clipped(tmp_path, boxes)


def test_boxes_for_a_list_or_by_path_absolute_path_or_file_name(tmp_path):
    tmp_path = tmp_path / ("a-long-directory-name-" * 4)   # an image's path is never cut in a box's place
    tmp_path.mkdir()
    img = str(tmp_path / "photo.jpg")
    assert read_boxes_file(_boxes_file(tmp_path, [[0, 0, 10, 10]])).boxes_for(img)[0].xyxy == (0, 0, 10, 10)
    for key in (img, str((tmp_path / "photo.jpg").resolve()), "photo.jpg"):
        (box,) = read_boxes_file(_boxes_file(tmp_path, {key: [[1, 1, 2, 2]]})).boxes_for(img)
        assert box.xyxy == (1.0, 1.0, 2.0, 2.0) and box.where.endswith(f"{key!r}[0]")
    assert read_boxes_file(_boxes_file(tmp_path, {"other.png": [[1, 1, 2, 2]]})).boxes_for(img) == []
    with pytest.raises(DataError, match=r"b.json: 'photo.jpg'\[0\]: a box is four numbers"):
        read_boxes_file(_boxes_file(tmp_path, {"photo.jpg": [[1, 1]]}))
    with pytest.raises(DataError, match="expected a list of boxes, an object keyed by image, COCO detection "
                                        "results or densecap's results.json, got str"):
        read_boxes_file(_boxes_file(tmp_path, '"photo.jpg"'))


def test_a_key_naming_no_image_is_refused(tmp_path):
    images = [str(tmp_path / "a.jpg"), "rel/b.png"]
    read_boxes_file(_boxes_file(tmp_path, [[0, 0, 1, 1]])).check_images(images)
    read_boxes_file(_boxes_file(tmp_path, {"a.jpg": [], "rel/b.png": [], "b.png": [],
                                           str((tmp_path / "a.jpg").resolve()): []})).check_images(images)
    with pytest.raises(DataError, match=r"b.json: key 'c.jpg' names none of the images given"):
        read_boxes_file(_boxes_file(tmp_path, {"a.jpg": [], "c.jpg": []})).check_images(images)
    with pytest.raises(DataError, match="got int"):
        read_boxes_file(_boxes_file(tmp_path, "3"))


def test_open_image_reads_the_header_size_or_names_the_file(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, format="PNG")
    good = tmp_path / "x.png"
    good.write_bytes(buf.getvalue())
    image = open_image(str(good))
    assert (image.path, image.format, image.width, image.height) == (str(good), "PNG", 8, 6)
    with pytest.raises(DataError, match=r"gone.jpg: no such image file"):
        open_image(str(tmp_path / "gone.jpg"))
    bad = tmp_path / "cut.png"
    bad.write_bytes(buf.getvalue()[:40])
    with pytest.raises(DataError, match=r"cut.png: cannot decode image"):
        open_image(str(bad))


def test_read_inputs_pairs_each_image_with_its_clipped_boxes(tmp_path):
    paths = []
    for name, size in (("a.jpg", (40, 30)), ("b.jpg", (20, 20))):
        Image.new("RGB", size, (9, 9, 9)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    inputs = read_inputs(paths, _boxes_file(tmp_path, {"a.jpg": [[30, 20, 60, 60]]}))
    assert [(i.image.width, i.image.height, i.boxes) for i in inputs] == [(40, 30, [[30.0, 20.0, 40.0, 30.0]]),
                                                                        (20, 20, [])]
    assert [i.boxes for i in read_inputs(paths)] == [[], []]
