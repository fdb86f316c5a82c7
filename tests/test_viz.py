"""Pictures: valid PNGs of the documented pixel size, edge cases (0 boxes, long, non-ASCII)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from dvsa import viz
from dvsa.errors import DvsaError


def scene(h=60, w=80):
    img = np.full((h, w, 3), 230, np.uint8)
    img[5:30, 5:35] = (200, 30, 30)
    img[30:55, 40:75] = (30, 60, 200)
    return img


BOXES = [[5, 5, 35, 30], [40, 30, 75, 55]]
LONG = "a very long caption " * 30
UNICODE = "café über naïve — ñandú, Ωmega, $5 {x}_1"


def read_png(path, size):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size
        px = np.asarray(im.convert("RGB"))
    assert px.std() > 5, "picture is blank"
    return px


def test_region_captions_sorted_by_log_probability(tmp_path):
    out = viz.draw_region_captions(scene(), BOXES, ["a red square", "a blue square"],
                                   [-9.0, -1.5], tmp_path / "sub" / "fig10.png", title="t")
    assert out == tmp_path / "sub" / "fig10.png"
    px = read_png(out, (1200, 600))
    # The colour key lists the best caption first: region 2's swatch (blue) above region 1's.
    swatch_column = px[:, int(0.51 * 1200 + 0.01 * 0.48 * 1200)]
    colours = [tuple(c) for c in swatch_column if tuple(c) != (255, 255, 255)]
    first, last = np.array(colours[0]), np.array(colours[-1])
    assert np.abs(first - np.array([0x3c, 0xb4, 0x4b])).max() < 10  # colour of region 2
    assert np.abs(last - np.array([0xe6, 0x19, 0x4b])).max() < 10   # colour of region 1


def test_region_captions_edge_cases(tmp_path):
    read_png(viz.draw_region_captions(scene(), [], [], [], tmp_path / "none.png"), (1200, 600))
    many = [[i, i, i + 10, i + 10] for i in range(30)]
    caps = [LONG if i % 2 else UNICODE for i in range(30)]
    read_png(viz.draw_region_captions(scene(), np.array(many), caps, list(range(30)),
                                      tmp_path / "many.png", size=(800, 400)), (800, 400))
    with pytest.raises(DvsaError, match="captions: 1 given for 2 boxes"):
        viz.draw_region_captions(scene(), BOXES, ["x"], [0.0, 1.0], tmp_path / "bad.png")
    with pytest.raises(DvsaError, match=r"boxes must be \[K, 4\]"):
        viz.draw_region_captions(scene(), [[1, 2, 3]], ["x"], [0.0], tmp_path / "bad.png")


def test_image_inputs(tmp_path):
    import torch

    chw = torch.from_numpy(scene()).permute(2, 0, 1)
    assert viz.as_rgb_array(chw).shape == (60, 80, 3)
    assert viz.as_rgb_array(scene().astype(np.float32) / 255.0).max() == 230
    gray = viz.as_rgb_array(np.zeros((7, 9)))
    assert gray.shape == (7, 9, 3)
    Image.fromarray(scene()).save(tmp_path / "in.jpg")
    assert viz.as_rgb_array(tmp_path / "in.jpg").shape == (60, 80, 3)
    with pytest.raises(DvsaError, match="image must be"):
        viz.as_rgb_array(np.zeros((2, 3, 4, 5)))


def test_alignment_spans_and_edge_cases(tmp_path):
    assert viz._spans([-1, 0, 0, -1, 1, 1, 1]) == [(-1, 0, 1), (0, 1, 3), (-1, 3, 4), (1, 4, 7)]
    tokens = "a red square above a blue square".split()
    px = read_png(viz.draw_alignment(scene(), BOXES, tokens, [-1, 0, 0, -1, -1, 1, 1],
                                     tmp_path / "fig5.png", word_scores=[0.1] * 7),
                  (900, 900))
    # The sentence strip (bottom 27 %) carries both regions' colours as span backgrounds.
    strip = px[int(0.72 * 900):].reshape(-1, 3).astype(int)
    for colour in ((0xe6, 0x19, 0x4b), (0x3c, 0xb4, 0x4b)):
        tint = 255 + 0.45 * (np.array(colour) - 255)  # 45 % alpha over white
        assert (np.abs(strip - tint).max(axis=1) < 6).sum() > 50, colour
    words = (UNICODE + " " + LONG).split()
    read_png(viz.draw_alignment(scene(), BOXES, words, [i % 3 - 1 for i in range(len(words))],
                                tmp_path / "long.png", size=(500, 500)), (500, 500))
    read_png(viz.draw_alignment(scene(), [], ["hello"], [-1], tmp_path / "nobox.png"),
             (900, 900))
    read_png(viz.draw_alignment(scene(), BOXES, [], [], tmp_path / "empty.png"), (900, 900))
    with pytest.raises(DvsaError, match=r"assignment\[1\] = 2 but there are 2 boxes"):
        viz.draw_alignment(scene(), BOXES, ["a", "b"], [0, 2], tmp_path / "bad.png")


def test_search_results_grid(tmp_path):
    img = scene()
    results = [(img, BOXES[0]), img[5:30, 5:35], (img, np.array(BOXES[1])), img, img]
    out = viz.draw_search_results("red squ\u00e4re $x$", results, [0.9, 0.8, 0.5, 0.2, 0.1],
                                  tmp_path / "fig7.png", labels=[LONG] * 5, columns=3,
                                  cell_px=200)
    read_png(out, (600, 2 * 200 + 60))
    read_png(viz.draw_search_results("nothing", [], [], tmp_path / "empty.png"), (960, 300))
    with pytest.raises(DvsaError, match="scores: 1 given for 2 results"):
        viz.draw_search_results("q", [img, img], [1.0], tmp_path / "bad.png")


def test_plot_curves(tmp_path):
    hist = {"train/loss": [(s, 3.0 / (s + 1)) for s in range(50)],
            "val/loss": [(10, 1.0), (0, 2.0), (20, float("nan")), (30, 0.5)],
            UNICODE: []}
    px = read_png(viz.plot_curves(hist, tmp_path / "c.png", title=UNICODE, logy=True),
                  (900, 500))
    assert (np.abs(px.astype(int) - (0xe6, 0x19, 0x4b)).max(axis=2) < 10).sum() > 100
    read_png(viz.plot_curves({}, tmp_path / "empty.png", size=(300, 200)), (300, 200))


def test_no_mathtext_errors_on_dollar_signs(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. a missing glyph would warn
        viz.draw_region_captions(scene(), BOXES[:1], ["costs $5 or $6 \\frac"], [-1.0],
                                 tmp_path / "d.png")
