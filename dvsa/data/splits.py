"""Train / val / test assignment of image ids: a densecap-style split file, or a deterministic
split by image id (the paper's 5,000 val + 5,000 test, scaled down for small data)."""

from __future__ import annotations

import random
from typing import Iterable

from dvsa.errors import DataError
from dvsa.files import load_json

SPLITS = ("train", "val", "test")


def load_split_file(path: str) -> dict[int, str]:
    """``{"train": [ids], "val": [...], "test": [...]}`` -> ``{image_id: split}``.

    Unknown split names, non-integer ids and ids listed in two splits are errors.
    """
    d = load_json(path, "no such split file")
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected an object {{\"train\": [ids], \"val\": [...], \"test\": [...]}}")
    out: dict[int, str] = {}
    for split, ids in d.items():
        if split not in SPLITS:
            raise DataError(f"{path}: unknown split {split!r} (allowed: {', '.join(SPLITS)})")
        if not isinstance(ids, list):
            raise DataError(f"{path}: '{split}' must be a list of image ids")
        for pos, i in enumerate(ids):
            if not isinstance(i, int) or isinstance(i, bool):
                raise DataError(f"{path}: '{split}'[{pos}] is not an integer image id: {i!r}")
            if i in out and out[i] != split:
                raise DataError(f"{path}: image {i} is in both '{out[i]}' and '{split}'")
            out[i] = split
    return out


def default_split_sizes(n_images: int, val: int | None = None, test: int | None = None) -> tuple[int, int]:
    """The paper's 5,000 / 5,000, or a tenth of the data each when that is smaller."""
    scaled = max(1, n_images // 10) if n_images >= 3 else 0
    v = min(5000, scaled) if val is None else val
    t = min(5000, scaled) if test is None else test
    if v < 0 or t < 0 or v + t >= max(n_images, 1):
        raise DataError(f"--val-images {v} + --test-images {t} must leave training images (have {n_images})")
    return v, t


def deterministic_split(ids: Iterable[int], n_val: int, n_test: int, seed: int = 0) -> dict[int, str]:
    """Sort the ids, shuffle with a fixed seed: first ``n_val`` val, next ``n_test`` test."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    out = {i: "val" for i in order[:n_val]}
    out.update({i: "test" for i in order[n_val:n_val + n_test]})
    out.update({i: "train" for i in order[n_val + n_test:]})
    return out
