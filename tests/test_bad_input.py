"""Every bad input of the issue: dropped and counted (or a clear error), never a crash half-way."""

import io
import json

import pytest
from PIL import Image

from dvsa.data.prepare import KarpathySource, PrepareOptions, VGSource, prepare_karpathy, prepare_vg
from dvsa.data.shards import iter_samples
from dvsa.errors import DataError

LOCAL = PrepareOptions(use_ray=False, progress=False)


def jpeg(w=32, h=24, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def region(rid, iid, phrase, x=2, y=2, w=10, h=10):
    return {"region_id": rid, "image_id": iid, "phrase": phrase, "x": x, "y": y, "width": w, "height": h}


@pytest.fixture
def bad_vg(tmp_path):
    root = tmp_path / "vg"
    (root / "VG_100K").mkdir(parents=True)
    (root / "VG_100K_2").mkdir()
    good = jpeg()
    noisy = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(noisy, format="JPEG", quality=95)
    files = {1: good, 2: b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 10,
             3: noisy.getvalue()[: len(noisy.getvalue()) // 2],   # truncated JPEG
             5: good, 7: good, 8: good, 9: good}
    for iid, data in files.items():
        (root / ("VG_100K" if iid % 2 else "VG_100K_2") / f"{iid}.jpg").write_bytes(data)
    # 4: listed, no file; 6: listed, no region entry; 9: not in the split file
    image_data = [{"image_id": i, "url": f"https://x/{'VG_100K' if i % 2 else 'VG_100K_2'}/{i}.jpg",
                   "width": 32, "height": 24, "coco_id": None, "flickr_id": None} for i in (1, 2, 3, 4, 6, 7, 8, 9)]
    image_data[6]["width"] = 999  # image 8: metadata size differs from the file: noted, the file wins
    regions = [
        {"id": 1, "regions": [
            region(10, 1, "a red ball"),
            region(11, 1, ""),                               # empty phrase
            region(12, 1, "!!! ... ???"),                     # empty after cleaning
            region(13, 1, "zero width", w=0),                 # zero-width box
            region(14, 1, "beyond the edge", x=20, w=30),      # clipped to the image, kept
            region(15, 1, "outside", x=40, y=2, w=5),          # entirely outside: degenerate after clipping
            region(16, 1, "Café au lait ☕ naïve"),             # non-ASCII
            region(17, 1, "...dog!!!???,,,;;"),                # punctuation-heavy
            region(10, 1, "a red ball again"),                 # duplicate region id
            {"region_id": 18, "image_id": 1, "x": 1, "y": 1, "width": 3, "height": 3},  # no phrase
            region(19, 1, "bad box", x="left"),                # non-numeric coordinate
        ]},
        {"id": 2, "regions": [region(20, 2, "corrupt")]},
        {"id": 3, "regions": [region(30, 3, "truncated"), region(31, 3, "truncated")]},
        {"id": 4, "regions": [region(40, 4, "file missing")]},
        {"id": 5, "regions": [region(50, 5, "not in image data")]},
        {"id": 7, "regions": [region(70, 7, ""), region(71, 7, "x", w=-3)]},   # nothing valid left
        {"id": 8, "regions": [region(80, 8, "fine"), region(10, 8, "duplicate id across images")]},
        {"id": 1, "regions": [region(90, 1, "duplicate image entry")]},
        {"id": 9, "regions": [region(95, 9, "not in split")]},
        "not an object",
    ]
    (root / "image_data.json").write_text(json.dumps(image_data))
    (root / "region_descriptions.json").write_text(json.dumps(regions))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [1, 2, 3, 4, 6, 7], "val": [8], "test": [12345]}))  # 12345: unknown
    return root, split


def test_bad_vg_inputs_are_dropped_and_counted(bad_vg, tmp_path):
    root, split = bad_vg
    m = prepare_vg(VGSource(str(root), split_file=str(split), min_count=1), str(tmp_path / "out"), LOCAL)
    m.check_balance()
    assert m.dropped("images") == {
        "bad_element": 1, "corrupt_image": 2, "duplicate_image": 1, "missing_file": 1,
        "no_region_entry": 1, "no_valid_regions": 1, "not_in_image_data": 1, "not_in_split": 1}
    d = m.dropped("regions")
    assert d["empty_caption"] == 3          # 11, 12, 70
    assert d["degenerate_box"] == 3         # 13 (zero width), 15 (outside), 71 (negative width)
    assert d["bad_region"] == 2             # 18, 19
    assert d["duplicate_region_id"] == 2    # 10 again in image 1 and in image 8
    assert d["corrupt_image"] == 3 and d["missing_file"] == 1 and len(d) == 9
    assert d["duplicate_image"] == 1 and d["not_in_image_data"] == 1 and d["not_in_split"] == 1
    assert m.tally.inputs["images"] == 11 and m.tally.inputs["regions"] == 22
    assert m.written["images"] == 2 and m.written["regions"] == 5
    assert m.info["split_file_unknown_ids"] == 1
    assert m.info["boxes_clipped"] == 1
    assert m.info["size_differs_from_metadata"] == 1

    samples = {k: meta for k, _, meta in iter_samples(str(tmp_path / "out"))}
    assert set(samples) == {"1", "8"}
    by_id = {r["id"]: r for r in samples["1"]["regions"]}
    assert sorted(by_id) == [10, 14, 16, 17]
    assert by_id[10]["raw"] == "a red ball"                    # the first of the duplicate ids kept
    assert by_id[14]["box"] == [20, 2, 32, 12]                 # clipped to the 32 px wide image
    assert by_id[16]["tokens"] == ["cafe", "au", "lait", "naive"]
    assert by_id[17]["tokens"] == ["dog"]


def test_truncated_region_json_is_a_clear_error(bad_vg, tmp_path):
    root, split = bad_vg
    p = root / "region_descriptions.json"
    p.write_text(p.read_text()[:300])
    with pytest.raises(DataError, match=r"region_descriptions.json: malformed or truncated JSON in element #\d+ "
                                        r".*read \d+ bytes"):
        prepare_vg(VGSource(str(root), split_file=str(split)), str(tmp_path / "out"), LOCAL)


def test_malformed_image_data_is_a_clear_error(bad_vg, tmp_path):
    root, split = bad_vg
    (root / "image_data.json").write_text('[{"image_id": 1, "width": 3,, }]')
    with pytest.raises(DataError, match=r"image_data.json: malformed or truncated JSON in element #0"):
        prepare_vg(VGSource(str(root), split_file=str(split)), str(tmp_path / "out"), LOCAL)


def test_split_file_errors(bad_vg, tmp_path):
    root, _ = bad_vg
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"train": [1, "two"]}))
    with pytest.raises(DataError, match=r"s.json: 'train'\[1\] is not an integer image id"):
        prepare_vg(VGSource(str(root), split_file=str(bad)), str(tmp_path / "out"), LOCAL)


def test_bad_karpathy_inputs(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg())
    (root / "b.jpg").write_bytes(b"garbage")
    (root / "c.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 255)).save(buf, format="PNG")
    (root / "d.png").write_bytes(buf.getvalue())
    images = [
        {"filename": "a.jpg", "imgid": 0, "split": "train",
         "sentences": [{"raw": "A dog."}, {"raw": "?!"}, {"tokens": ["a", "cat"]}, {"raw": None}]},
        {"filename": "b.jpg", "imgid": 1, "split": "val", "sentences": [{"raw": "corrupt"}]},
        {"filename": "c.png", "imgid": 2, "split": "test", "sentences": [{"raw": "empty file"}]},
        {"filename": "d.png", "imgid": 3, "split": "test", "sentences": [{"raw": "a png, re-encoded"}]},
        {"filename": "e.jpg", "imgid": 4, "split": "train", "sentences": [{"raw": "missing"}]},
        {"filename": "a.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "duplicate"}]},
        {"filename": "a.jpg", "imgid": 5, "split": "dev", "sentences": [{"raw": "unknown split"}]},
        {"imgid": 6, "split": "train", "sentences": [{"raw": "no filename"}]},
        {"filename": "a.jpg", "imgid": 7, "split": "train", "sentences": [{"raw": ""}]},
    ]
    js = tmp_path / "dataset_x.json"
    js.write_text(json.dumps({"dataset": "x", "images": images}))
    m = prepare_karpathy(KarpathySource(str(js), str(root), min_count=1), str(tmp_path / "out"), LOCAL)
    m.check_balance()
    assert m.dropped("images") == {"bad_element": 1, "corrupt_image": 2, "duplicate_image": 1,
                                      "missing_file": 1, "no_valid_captions": 1, "unknown_split": 1}
    assert m.dropped("sentences") == {"bad_element": 1, "bad_sentence": 1, "corrupt_image": 2,
                                         "duplicate_image": 1, "empty_caption": 2, "missing_file": 1,
                                         "unknown_split": 1}
    assert m.written == {"images": 2, "regions": 0, "sentences": 3}
    assert m.info["images_reencoded"] == 1
    samples = {k: (jpg, meta) for k, jpg, meta in iter_samples(str(tmp_path / "out"))}
    assert [s["tokens"] for s in samples["0"][1]["sentences"]] == [["a", "dog"], ["a", "cat"]]
    assert Image.open(io.BytesIO(samples["3"][0])).format == "JPEG"


def test_markers_verification_still_catches_truncation():
    from dvsa.data.images import BadImage, prepare_image

    good = jpeg()
    assert prepare_image(good, verify="markers").data == good
    assert prepare_image(good + b"\x00\x00", verify="markers").action == "copied"
    for bad in (good[: len(good) // 2], b"\xff\xd8 not a jpeg", b""):
        with pytest.raises(BadImage):
            prepare_image(bad, verify="markers")
        with pytest.raises(BadImage):
            prepare_image(bad, verify="decode")


@pytest.mark.parametrize("kind", ["baseline", "progressive", "grey", "exif", "cmyk", "png"])
def test_markers_path_reads_the_frame_size_pil_reads(kind):
    """The markers path reads width/height from the SOF segment itself; every kind of file
    must come out as PIL sees it (and CMYK / non-JPEG still go through PIL's re-encode)."""
    from dvsa.data.images import jpeg_frame, prepare_image

    im = Image.new("RGB", (37, 23), (200, 30, 60))
    buf = io.BytesIO()
    if kind == "progressive":
        im.save(buf, "JPEG", progressive=True)
    elif kind == "grey":
        im.convert("L").save(buf, "JPEG")
    elif kind == "exif":
        exif = Image.Exif()
        exif[0x010E] = "a description long enough to move the frame header " * 20
        im.save(buf, "JPEG", exif=exif.tobytes())
    elif kind == "cmyk":
        im.convert("CMYK").save(buf, "JPEG")
    elif kind == "png":
        im.save(buf, "PNG")
    else:
        im.save(buf, "JPEG")
    data = buf.getvalue()
    frame = jpeg_frame(data)
    if kind == "png":
        assert frame is None
    else:
        assert frame[:2] == (37, 23) and frame[2] == {"grey": 1, "cmyk": 4}.get(kind, 3)
    fast, slow = prepare_image(data, verify="markers"), prepare_image(data, verify="decode")
    assert (fast.width, fast.height, fast.action) == (slow.width, slow.height, slow.action) == (
        37, 23, "reencoded" if kind in ("cmyk", "png") else "copied")
    assert fast.data == slow.data or kind in ("cmyk", "png")
