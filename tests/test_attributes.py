"""Region attribute accuracy against a synthetic world's truth."""

from __future__ import annotations

import pytest

from dvsa.experiments.attributes import attribute_accuracy, caption_attributes

TRUTH = {
    "colours": ["red", "blue", "green"],
    "shapes": ["circle", "square"],
    "images": [
        {"image_id": 7, "width": 100, "height": 100,
         "objects": [{"box": [0, 0, 40, 40], "colour": "red", "shape": "circle"},
                     {"box": [50, 50, 90, 90], "colour": "blue", "shape": "square"}]},
    ],
}


def test_caption_attributes():
    assert caption_attributes("A small Red circle!", ["red", "blue"], ["circle"]) == ({"red"}, {"circle"})


def test_known_answers():
    preds = [
        {"image_id": 7, "box": [1, 1, 39, 41], "caption": "a red circle"},              # right
        {"image_id": 7, "box": [50, 50, 90, 90], "caption": "blue square on the right"},  # right
        {"image_id": 7, "box": [50, 52, 88, 90], "caption": "a red square"},             # wrong colour
        {"image_id": 7, "box": [0, 0, 40, 40], "caption": "a red circle and a blue square"},  # names two
        {"image_id": 7, "box": [60, 0, 99, 20], "caption": "red circle"},                # overlaps nothing
    ]
    r = attribute_accuracy(preds, TRUTH, sizes={})
    assert r.regions == 4 and r.unmatched == 1
    assert r.accuracy == pytest.approx(2 / 4)
    assert r.colour_accuracy == pytest.approx(3 / 4)   # the two-object caption names red too
    assert r.shape_accuracy == pytest.approx(4 / 4)
    assert r.metrics()["region/attr_acc"] == pytest.approx(0.5)


def test_stored_frame_scaling():
    # the JPEG was stored at half size: a box in that frame must still match its object
    preds = [{"image_id": 7, "box": [25, 25, 45, 45], "caption": "blue square"}]
    r = attribute_accuracy(preds, TRUTH, sizes={"7": (50, 50)})
    assert r.accuracy == 1.0 and r.unmatched == 0


def test_unknown_image_is_an_error():
    with pytest.raises(KeyError, match="not in truth.json"):
        attribute_accuracy([{"image_id": 99, "box": [0, 0, 1, 1], "caption": "x"}], TRUTH, sizes={})
