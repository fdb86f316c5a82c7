"""Pictures of the paper's figures, as PNG files (MLflow artifacts, run output dirs).

* :func:`draw_region_captions` (Fig. 10): regions boxed in colour; their captions listed to
  the right, sorted by log probability, each with its colour key.
* :func:`draw_alignment` (Fig. 5): the words of a sentence coloured like the box each is
  aligned to; runs of words on the same box (MRF snippets) shown as one coloured span.
* :func:`draw_search_results` (Fig. 7): the top-k regions for a text query, as a grid.
* :func:`plot_curves`: metric/loss histories ``{name: [(step, value), ...]}``.

Every function draws on its own :class:`matplotlib.figure.Figure` with the Agg canvas (no
pyplot global state, no display needed), writes a PNG of a known pixel size to ``path``
(parent directories created) and returns the path. User text is drawn verbatim (matplotlib's
``$...$`` math parsing is off), long texts are wrapped or shortened.

Images may be a PIL image, a file path, or an array/tensor ``HxW``, ``HxWx3``, ``HxWx4`` or
``3xHxW`` (uint8, or float in [0, 1]); boxes are ``[x1, y1, x2, y2]`` in that image's pixels.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from dvsa.errors import DvsaError

DPI = 100
_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
            "#bfef45", "#9a6324", "#469990", "#800000", "#000075", "#808000", "#ffe119",
            "#dcbeff", "#aaffc3", "#fabed4", "#a9a9a9")


def region_colour(i: int) -> str:
    """A distinct colour per region index (cycled; arbitrary, as in the paper's figures)."""
    return _PALETTE[i % len(_PALETTE)]


# --------------------------------------------------------------------------- inputs


def as_rgb_array(image: Any) -> np.ndarray:
    """``uint8[H, W, 3]`` from a PIL image, a path, or an array/tensor (see module doc)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DvsaError(f"image must be HxW, HxWx3/4 or 3xHxW, got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        arr = np.nan_to_num(arr.astype(np.float64))
        if arr.max() <= 1.0:  # floats in [0, 1]
            arr = arr * 255.0
        arr = np.clip(arr, 0.0, 255.0).round().astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def as_boxes(boxes: Any, what: str = "boxes") -> np.ndarray:
    """``float[K, 4]`` from a list/array/tensor of ``[x1, y1, x2, y2]`` (K may be 0)."""
    if boxes is None:
        return np.zeros((0, 4))
    if hasattr(boxes, "detach"):
        boxes = boxes.detach().cpu().numpy()
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise DvsaError(f"{what} must be [K, 4] (x1, y1, x2, y2), got shape {tuple(arr.shape)}")
    return arr


def _check_len(name: str, values: Sequence, expected: int) -> None:
    if len(values) != expected:
        raise DvsaError(f"{name}: {len(values)} given for {expected} boxes")


def _shorten(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# --------------------------------------------------------------------------- drawing helpers


def _figure(width_px: int, height_px: int) -> Figure:
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)  # no bbox_inches: the pixel size stays as asked
    return path


def _show_image(ax, img: np.ndarray) -> None:
    ax.imshow(img, interpolation="nearest")
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_box(ax, box: np.ndarray, colour: str, label: str | None = None,
              linewidth: float = 2.5, fontsize: float = 8) -> None:
    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                           linewidth=linewidth))
    if label:
        ax.text(x1, y1, label, color="white", fontsize=fontsize, va="bottom", ha="left",
                parse_math=False, clip_on=True,
                bbox=dict(facecolor=colour, edgecolor="none", alpha=0.85, pad=1.5))


# --------------------------------------------------------------------------- Fig. 10


def draw_region_captions(image: Any, boxes: Any, captions: Sequence[str],
                         scores: Sequence[float], path: str | Path, *,
                         max_captions: int = 20, title: str | None = None,
                         size: tuple[int, int] = (1200, 600)) -> Path:
    """Fig. 10: boxes coloured and numbered; captions listed on the right, highest log
    probability first, each behind a swatch of its box's colour (the colour key).

    ``scores`` are the captions' log probabilities. At most ``max_captions`` are listed
    (the best ones; the rest are counted in a footer).
    """
    img = as_rgb_array(image)
    boxes = as_boxes(boxes)
    _check_len("captions", captions, len(boxes))
    _check_len("scores", scores, len(boxes))
    fig = _figure(*size)
    ax_img = fig.add_axes((0.01, 0.02, 0.48, 0.90 if title else 0.96))
    ax_txt = fig.add_axes((0.51, 0.02, 0.48, 0.90 if title else 0.96))
    if title:
        fig.suptitle(_shorten(title, 120), fontsize=12, parse_math=False)
    _show_image(ax_img, img)
    order = sorted(range(len(boxes)), key=lambda i: -float(scores[i]))
    for i in range(len(boxes)):
        _draw_box(ax_img, boxes[i], region_colour(i), str(i + 1))
    ax_txt.set_axis_off()
    ax_txt.set_xlim(0, 1)
    ax_txt.set_ylim(0, 1)
    shown = order[:max_captions]
    if not shown:
        ax_txt.text(0.02, 0.98, "(no regions)", va="top", fontsize=12, color="0.4")
    else:
        more = len(order) - len(shown)
        row = 1.0 / max(len(shown) + (1 if more else 0), 8)
        row_px = row * ax_txt.get_position().height * size[1]
        font = min(12.0, row_px * 0.32)  # points: two lines of 0.85 * font fit in a row
        text_px = 0.80 * ax_txt.get_position().width * size[0]  # between swatch and score
        width_chars = max(12, int(text_px / (0.55 * font * DPI / 72)))
        for r, i in enumerate(shown):
            y = 1.0 - (r + 0.5) * row
            ax_txt.add_patch(Rectangle((0.0, y - row * 0.35), 0.035, row * 0.7,
                                       facecolor=region_colour(i), edgecolor="none"))
            text = f"{i + 1}. {_shorten(captions[i], 3 * width_chars)}"
            wrapped = textwrap.shorten(text, width=2 * width_chars, placeholder="\u2026")
            lines = textwrap.wrap(wrapped, width=width_chars) or [""]
            if len(lines) > 2:
                lines = [lines[0], lines[1][: width_chars - 1].rstrip() + "\u2026"]
            ax_txt.text(0.05, y, "\n".join(lines), va="center", ha="left",
                        fontsize=font * (0.85 if len(lines) > 1 else 1.0), parse_math=False)
            ax_txt.text(1.0, y, f"{float(scores[i]):.2f}", va="center", ha="right",
                        fontsize=font * 0.85, color="0.35", family="monospace")
        if more:
            ax_txt.text(0.05, 1.0 - (len(shown) + 0.5) * row,
                        f"+ {more} more regions not listed", va="center", fontsize=font * 0.85,
                        color="0.4")
    return _save(fig, path)


# --------------------------------------------------------------------------- Fig. 5


def _spans(assignment: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of equal region index: ``[(region, start, end)]`` (``end`` exclusive)."""
    out: list[tuple[int, int, int]] = []
    for t, r in enumerate(assignment):
        r = int(r)
        if out and out[-1][0] == r and out[-1][2] == t:
            out[-1] = (r, out[-1][1], t + 1)
        else:
            out.append((r, t, t + 1))
    return out


def draw_alignment(image: Any, boxes: Any, tokens: Sequence[str], assignment: Sequence[int],
                   path: str | Path, *, word_scores: Sequence[float] | None = None,
                   title: str | None = None, size: tuple[int, int] = (900, 900)) -> Path:
    """Fig. 5: each word coloured like the box it is aligned to (``assignment[t]`` = box
    index, ``-1`` = not aligned / hidden). Consecutive words on the same box (an MRF
    snippet) form one coloured span; each aligned box is labelled with its words and, when
    ``word_scores`` (``v_i^T s_t``) are given, their best score.
    """
    img = as_rgb_array(image)
    boxes = as_boxes(boxes)
    if len(assignment) != len(tokens):
        raise DvsaError(f"assignment: {len(assignment)} given for {len(tokens)} tokens")
    if word_scores is not None and len(word_scores) != len(tokens):
        raise DvsaError(f"word_scores: {len(word_scores)} given for {len(tokens)} tokens")
    for t, r in enumerate(assignment):
        if not -1 <= int(r) < len(boxes):
            raise DvsaError(f"assignment[{t}] = {int(r)} but there are {len(boxes)} boxes")
    fig = _figure(*size)
    top = 0.93 if title else 0.98
    ax_img = fig.add_axes((0.02, 0.30, 0.96, top - 0.30))
    ax_txt = fig.add_axes((0.02, 0.01, 0.96, 0.27))
    if title:
        fig.suptitle(_shorten(title, 120), fontsize=12, parse_math=False)
    _show_image(ax_img, img)
    spans = _spans(assignment)
    words_of: dict[int, list[str]] = {}
    best: dict[int, float] = {}
    for r, s, e in spans:
        if r < 0:
            continue
        words_of.setdefault(r, []).append(" ".join(tokens[s:e]))
        if word_scores is not None:
            best[r] = max(best.get(r, -math.inf), *(float(x) for x in word_scores[s:e]))
    for i, box in enumerate(boxes):
        if i not in words_of:
            x1, y1, x2, y2 = box
            ax_img.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False,
                                       edgecolor="0.75", linewidth=1.0, linestyle="--"))
    for i, words in words_of.items():
        label = _shorten(" / ".join(words), 40)
        if i in best:
            label += f"  {best[i]:.2f}"
        _draw_box(ax_img, boxes[i], region_colour(i), label, fontsize=9)
    _flow_spans(fig, ax_txt, tokens, spans)
    return _save(fig, path)


def _flow_spans(fig: Figure, ax, tokens: Sequence[str], spans) -> None:
    """Lay the sentence out left to right, wrapping lines; aligned spans on coloured boxes."""
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    if not tokens:
        ax.text(0.0, 0.9, "(empty sentence)", va="top", fontsize=12, color="0.4")
        return
    renderer = fig.canvas.get_renderer()
    ax_box = ax.get_window_extent(renderer)
    n_words = len(tokens)
    font = 16 if n_words <= 20 else 13 if n_words <= 45 else 10
    line_h = font * 2.0 / ax_box.height  # axes fraction per line
    gap = font * 0.6 / ax_box.width
    x, y = 0.0, 1.0 - line_h * 0.6
    for r, s, e in spans:
        text = _shorten(" ".join(tokens[s:e]), 80)
        style = dict(fontsize=font, va="center", ha="left", parse_math=False)
        if r >= 0:
            style.update(color="black", bbox=dict(facecolor=to_rgba(region_colour(r), 0.45),
                                                  edgecolor=region_colour(r), pad=2.5))
        else:
            style.update(color="0.45")
        artist = ax.text(x, y, text, **style)
        width = artist.get_window_extent(renderer).width / ax_box.width
        if x > 0 and x + width > 1.0:  # wrap to the next line
            x, y = 0.0, y - line_h
            artist.set_position((x, y))
        if y - line_h * 0.5 < 0:  # no room for another line
            artist.remove()
            ax.text(1.0, 0.0, "\u2026", fontsize=font, va="bottom", ha="right")
            break
        x += width + gap


# --------------------------------------------------------------------------- Fig. 7


def draw_search_results(query: str, results: Sequence[Any], scores: Sequence[float],
                        path: str | Path, *, labels: Sequence[str] | None = None,
                        columns: int = 4, cell_px: int = 240) -> Path:
    """Fig. 7: the top-k regions for a text query, best first, as a grid.

    Each result is a crop (an image) or ``(image, box)``: the whole image with that region
    boxed. The PNG is ``columns * cell_px`` wide and ``rows * cell_px + 60`` high.
    """
    if len(scores) != len(results):
        raise DvsaError(f"scores: {len(scores)} given for {len(results)} results")
    if labels is not None and len(labels) != len(results):
        raise DvsaError(f"labels: {len(labels)} given for {len(results)} results")
    if columns < 1:
        raise DvsaError(f"columns must be >= 1, got {columns}")
    rows = max(1, math.ceil(len(results) / columns))
    width, height = columns * cell_px, rows * cell_px + 60
    fig = _figure(width, height)
    fig.text(0.5, 1 - 30 / height, _shorten(f"query: \u201c{query}\u201d", 100), ha="center",
             va="center", fontsize=14, parse_math=False)
    if not results:
        fig.text(0.5, 0.5 * (1 - 60 / height), "(no results)", ha="center", va="center",
                 fontsize=12, color="0.4")
    for k, item in enumerate(results):
        r, c = divmod(k, columns)
        left = (c * cell_px + 4) / width
        bottom = ((rows - 1 - r) * cell_px + 4) / height
        ax = fig.add_axes((left, bottom, (cell_px - 8) / width, (cell_px - 30) / height))
        if isinstance(item, tuple) and len(item) == 2:
            img, box = as_rgb_array(item[0]), as_boxes(item[1], f"result {k} box")
            _show_image(ax, img)
            for b in box:
                _draw_box(ax, b, region_colour(0), linewidth=3)
        else:
            _show_image(ax, as_rgb_array(item))
        caption = f"#{k + 1}  {float(scores[k]):.3f}"
        if labels is not None:
            caption += "  " + _shorten(labels[k], 24)
        ax.set_title(caption, fontsize=9, parse_math=False)
    return _save(fig, path)


# --------------------------------------------------------------------------- curves


def plot_curves(histories: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *,
                title: str | None = None, xlabel: str = "step", ylabel: str = "value",
                logy: bool = False, size: tuple[int, int] = (900, 500)) -> Path:
    """Loss/metric curves, one line per name (points sorted by step; NaN/inf left out)."""
    fig = _figure(*size)
    ax = fig.add_subplot(1, 1, 1)
    plotted = 0
    for n, (name, points) in enumerate(histories.items()):
        pts = sorted((float(s), float(v)) for s, v in points
                     if math.isfinite(float(s)) and math.isfinite(float(v))
                     and (not logy or float(v) > 0))
        if not pts:
            continue
        steps, values = zip(*pts)
        ax.plot(steps, values, label=_shorten(name, 40), color=region_colour(n),
                marker="o" if len(pts) < 30 else None, markersize=3)
        plotted += 1
    if logy and plotted:
        ax.set_yscale("log")
    if plotted:
        ax.legend(loc="best", fontsize=9)
    else:
        ax.text(0.5, 0.5, "(no data)", ha="center", va="center", transform=ax.transAxes,
                fontsize=12, color="0.4")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(_shorten(title, 100), parse_math=False)
    fig.tight_layout()
    return _save(fig, path)
