"""Boxes as ``[x1, y1, x2, y2]`` in pixels: conversion, clipping, area, IoU, and the paper's
evaluation groups (regions of one image overlapping at IoU >= 0.7 merged into their mean box).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Box = Sequence[float]


def xywh_to_xyxy(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y + h]


def clip_box(box: Box, width: float, height: float) -> list[float]:
    """Clip to the image ``[0, width] x [0, height]`` (the result may be degenerate)."""
    x1, y1, x2, y2 = box
    return [min(max(x1, 0), width), min(max(y1, 0), height),
            min(max(x2, 0), width), min(max(y2, 0), height)]


def box_area(box: Box) -> float:
    """Area, 0 for a degenerate box (x2 <= x1 or y2 <= y1)."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def is_degenerate(box: Box) -> bool:
    return not (box[2] > box[0] and box[3] > box[1])


def iou(a: Box, b: Box) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU: a float[N,4], b float[M,4] -> float[N,M]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(union > 0, inter / union, 0.0)
    return out


def group_boxes(boxes: Sequence[Box], threshold: float = 0.7) -> list[tuple[list[int], list[float]]]:
    """Greedy merge (as densecap's preprocessing): among the boxes not yet grouped, take the
    one with the most others at IoU >= threshold (ties: lowest index), group it with those
    others, assign the group their mean box; repeat until none are left.

    Returns ``[(member indices ascending, mean box), ...]`` in the order groups were formed;
    every index appears in exactly one group.
    """
    n = len(boxes)
    if n == 0:
        return []
    arr = np.asarray(boxes, dtype=np.float64).reshape(n, 4)
    close = iou_matrix(arr, arr) >= threshold
    np.fill_diagonal(close, True)
    degree = close.sum(axis=1)                 # neighbours among the boxes still ungrouped
    remaining = np.ones(n, dtype=bool)
    groups: list[tuple[list[int], list[float]]] = []
    while True:
        live = np.flatnonzero(remaining)
        if live.size == 0:
            break
        best = int(live[np.argmax(degree[live])])  # first index of the maximum
        if degree[best] == 1:                   # only singletons left: they come in index order
            groups.extend(([int(i)], arr[i].tolist()) for i in live)
            break
        members = np.flatnonzero(close[best] & remaining)
        remaining[members] = False
        degree -= close[:, members].sum(axis=1)
        groups.append(([int(i) for i in members], (arr[members].sum(axis=0) / members.size).tolist()))
    return groups
