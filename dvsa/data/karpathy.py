"""Karpathy split files (``dataset_coco.json``, ``dataset_flickr8k.json``,
``dataset_flickr30k.json``, and ``dvsa synth``'s ``dataset_synth.json``), streamed.

``images[]``: ``filepath`` (may be absent, as in the Flickr files), ``filename``, ``split``
(train / val / test / restval: restval is folded into train, as is usual), ``sentences[].raw``,
``cocoid`` (COCO only), ``imgid``. Captions are re-tokenised from ``raw`` with
:func:`dvsa.text.clean_caption` so every source shares one cleaning.
"""

from __future__ import annotations

import posixpath
from typing import Iterator

from dvsa.data.jsonstream import iter_items
from dvsa.errors import DataError
from dvsa.files import load_json

SPLIT_MAP = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def iter_karpathy(json_path: str) -> Iterator[tuple[int, dict]]:
    """``(element_index, image dict)`` per element of ``images``."""
    for k, e in enumerate(iter_items(json_path, "images.item")):
        yield k, e


def image_id_of(e: dict) -> int | None:
    """The sample id: ``cocoid`` when present (so VG's ``coco_id`` can be matched), else ``imgid``."""
    for key in ("cocoid", "imgid"):
        v = e.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def image_relpath(e: dict) -> str | None:
    name = e.get("filename")
    if not isinstance(name, str) or not name:
        return None
    folder = e.get("filepath")
    return posixpath.join(folder, name) if isinstance(folder, str) and folder else name


def load_proposals(path: str) -> dict[str, list]:
    """``{"<image id>": [[x1, y1, x2, y2], ...]}``."""
    d = load_json(path, "no such proposals file")
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected an object mapping image id -> list of boxes")
    return d
