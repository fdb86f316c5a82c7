import json

import pytest

from dvsa.data import karpathy as kp
from dvsa.data import vg
from dvsa.data.jsonstream import iter_items
from dvsa.data.splits import default_split_sizes, deterministic_split, load_split_file
from dvsa.errors import DataError


def write(p, obj):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))
    return p


def test_vg_image_data_and_regions(tmp_path):
    write(tmp_path / "image_data.json", [
        {"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg", "width": 800,
         "height": 600, "coco_id": None, "flickr_id": 5},
        {"image_id": 2, "url": None, "width": 10, "height": 10, "coco_id": 9, "flickr_id": None},
    ])
    write(tmp_path / "region_descriptions.json", [
        {"id": 1, "regions": [{"region_id": 7, "image_id": 1, "phrase": "x", "x": 0, "y": 0, "width": 1, "height": 1}]},
        {"regions": [{"region_id": 8, "image_id": 2, "phrase": "y", "x": 0, "y": 0, "width": 1, "height": 1}]},
        {"id": 3, "regions": "not a list"},
    ])
    data = vg.read_image_data(str(tmp_path))
    assert data[1] == {"width": 800, "height": 600, "coco_id": None, "flickr_id": 5, "relpath": "VG_100K_2/1.jpg"}
    assert data[2]["relpath"] is None and data[2]["coco_id"] == 9
    entries = list(vg.iter_region_entries(str(tmp_path)))
    assert [(e[0], len(e[1]), e[2]) for e in entries] == [(1, 1, 0), (2, 1, 1), (None, 0, 2)]

    (tmp_path / "VG_100K").mkdir()
    (tmp_path / "VG_100K" / "2.jpg").write_bytes(b"x")
    assert vg.find_image(str(tmp_path), 2, None) == str(tmp_path / "VG_100K" / "2.jpg")
    assert vg.find_image(str(tmp_path), 1, "VG_100K_2/1.jpg") is None


def test_vg_image_data_bad_id(tmp_path):
    write(tmp_path / "image_data.json", [{"image_id": 1}, {"image_id": "two"}])
    with pytest.raises(DataError, match=r"image_data.json: element #1 has no integer 'image_id'"):
        vg.read_image_data(str(tmp_path))


def test_truncated_json_names_file_and_position(tmp_path):
    p = tmp_path / "region_descriptions.json"
    p.write_text('[{"id": 1, "regions": []}, {"id": 2, "regions": [{"phrase": "a')
    it = iter_items(str(p), "item")
    assert next(it) == {"id": 1, "regions": []}
    with pytest.raises(DataError, match=r"region_descriptions.json: malformed or truncated JSON in element #1 "
                                        r".*read \d+ bytes"):
        next(it)
    with pytest.raises(DataError, match="no such file"):
        list(iter_items(str(tmp_path / "nope.json")))


def test_karpathy_formats(tmp_path):
    # COCO style (filepath + cocoid) and Flickr style (no filepath, no cocoid), restval -> train
    p = write(tmp_path / "dataset_x.json", {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "a.jpg", "imgid": 0, "split": "restval", "cocoid": 42,
         "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}]},
        {"filename": "b.jpg", "imgid": 1, "split": "test", "sentences": []},
    ]})
    items = [e for _, e in kp.iter_karpathy(str(p))]
    assert [kp.image_id_of(e) for e in items] == [42, 1]
    assert [kp.image_relpath(e) for e in items] == ["val2014/a.jpg", "b.jpg"]
    assert [kp.SPLIT_MAP[e["split"]] for e in items] == ["train", "test"]


def test_split_file(tmp_path):
    p = write(tmp_path / "s.json", {"train": [1, 2], "val": [3], "test": [4]})
    assert load_split_file(str(p)) == {1: "train", 2: "train", 3: "val", 4: "test"}
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_split_file(str(write(tmp_path / "a.json", {"dev": [1]})))
    with pytest.raises(DataError, match=r"'val'\[1\] is not an integer"):
        load_split_file(str(write(tmp_path / "b.json", {"val": [1, "x"]})))
    with pytest.raises(DataError, match="image 1 is in both 'train' and 'test'"):
        load_split_file(str(write(tmp_path / "c.json", {"train": [1], "test": [1]})))
    (tmp_path / "d.json").write_text('{"train": [1,')
    with pytest.raises(DataError, match=r"d.json: invalid JSON at line 1"):
        load_split_file(str(tmp_path / "d.json"))


def test_deterministic_split():
    assert default_split_sizes(108_077) == (5000, 5000)
    assert default_split_sizes(60) == (6, 6)
    assert default_split_sizes(60, 2, 3) == (2, 3)
    with pytest.raises(DataError):
        default_split_sizes(10, 5, 5)
    ids = list(range(100, 200))
    a = deterministic_split(ids, 10, 5)
    assert a == deterministic_split(list(reversed(ids)), 10, 5)   # depends on the ids only
    assert sorted(a) == ids
    assert [sum(1 for s in a.values() if s == k) for k in ("train", "val", "test")] == [85, 10, 5]


def test_small_json_files_name_the_file_and_where(tmp_path):
    from dvsa.files import load_json

    good = tmp_path / "ok.json"
    good.write_text('{"a": [1, 2]}')
    assert load_json(str(good)) == {"a": [1, 2]}
    assert load_json(f"file://{good}") == {"a": [1, 2]}
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": [1,\n 2,, 3]}')
    with pytest.raises(DataError, match=r"bad.json: invalid JSON at line 2, column 4"):
        load_json(str(bad))
    with pytest.raises(DataError, match=r"nope.json: no such vocabulary file"):
        load_json(str(tmp_path / "nope.json"), "no such vocabulary file")
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"caf\u00e9": 1}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.json: not UTF-8 text \(invalid continuation byte at byte 5\)"):
        load_json(str(latin))
    with pytest.raises(DataError, match="is a directory"):
        load_json(str(tmp_path))


def test_streamed_json_errors_are_readable(tmp_path):
    """Bytes that are not UTF-8 inside region_descriptions.json: the error names the file and
    the element, and quotes the parser's words as text (not a bytes repr)."""
    from dvsa.data.jsonstream import iter_items

    p = tmp_path / "region_descriptions.json"
    p.write_bytes(b'[{"id": 1, "regions": []}, {"id": 2, "regions": [{"phrase": "caf\xe9"}]}]')
    with pytest.raises(DataError) as e:
        list(iter_items(str(p)))
    msg = str(e.value)
    assert msg.startswith(f"{p}: malformed or truncated JSON in element #1 under 'item'")
    assert "invalid bytes in UTF8 string" in msg and "b'" not in msg and '"phrase"' in msg
    p.write_bytes(b'[{"id": 1, "regions": []}, {"id": 2, "regi')
    with pytest.raises(DataError, match=r"element #1 .*premature EOF$"):
        list(iter_items(str(p)))
