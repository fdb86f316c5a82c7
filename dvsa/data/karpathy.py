"""Karpathy split files (``dataset_coco.json``, ``dataset_flickr8k.json``,
``dataset_flickr30k.json``, and ``dvsa synth``'s ``dataset_synth.json``), streamed.

``images[]``: ``filepath`` (may be absent, as in the Flickr files), ``filename``, ``split``
(train / val / test / restval: restval is folded into train, as is usual), ``sentences[].raw``,
``cocoid`` (COCO only), ``imgid``. Captions are re-tokenised from ``raw`` with
:func:`dvsa.text.clean_caption` so every source shares one cleaning.

COCO images stored under their 2017 names (``train2017/000000123456.jpg``) are found from the
split file's 2014 names (``val2014/COCO_val2014_000000123456.jpg``) as a fallback
(:func:`image_relpaths`). Other files often mistaken for a split file (neuraltalk2's
``coco_raw.json``, COCO's ``captions_train2014.json``) are named in a one-line error
(:func:`check_layout`).
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Iterator

from dvsa.data.jsonstream import first_item, iter_items, top_level
from dvsa.errors import DataError
from dvsa.files import load_json

SPLIT_MAP = {"train": "train", "restval": "train", "val": "val", "test": "test"}
EXPECTED = ('expected a Karpathy split file (dataset_coco.json, dataset_flickr30k.json): '
            '{"images": [{"filename", "sentences": [{"raw"}], "split", "cocoid" or "imgid"}]}')
BY_FILENAME, BY_COCO2017_NAME = "filename", "coco2017_name"   # how an image file was found
_COCO2014 = re.compile(r"^COCO_(?:train|val|test)2014_(\d{12})\.jpg$")
_COCO2017_DIRS = ("train2017", "val2017")


def iter_karpathy(json_path: str) -> Iterator[tuple[int, dict]]:
    """``(element_index, image dict)`` per element of ``images``."""
    for k, e in enumerate(iter_items(json_path, "images.item")):
        yield k, e


def check_layout(json_path: str) -> None:
    """DataError (one line) unless ``json_path`` looks like a Karpathy split file: an object
    whose ``images`` list starts with an image of ``filename`` and ``sentences``. Names the
    files it is often confused with."""
    kind = top_level(json_path)
    if kind == "a list":
        first = first_item(json_path, "item")
        if isinstance(first, dict) and {"file_path", "captions"} <= first.keys():
            raise DataError(f"{json_path}: a list of {{file_path, captions, id}} (neuraltalk2's coco_raw.json), "
                            f"not a Karpathy split file; {EXPECTED}")
        raise DataError(f"{json_path}: the top level is a list; {EXPECTED}")
    if kind != "an object":
        raise DataError(f"{json_path}: the top level is {kind}; {EXPECTED}")
    first = first_item(json_path, "images.item")
    if first is None:
        raise DataError(f"{json_path}: no 'images' list, or it is empty; {EXPECTED}")
    if isinstance(first, dict) and "file_name" in first and "filename" not in first:
        raise DataError(f"{json_path}: COCO's captions_*.json layout (images[].file_name, captions in "
                        f"'annotations', no splits), not a Karpathy split file; {EXPECTED}")
    if not isinstance(first, dict) or not ({"filename", "sentences"} & first.keys()):
        keys = sorted(first)[:8] if isinstance(first, dict) else type(first).__name__
        raise DataError(f"{json_path}: images[0] has {keys}, not filename and sentences; {EXPECTED}")


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


def image_relpaths(e: dict) -> list[tuple[str, str]]:
    """``(how, relative path)`` for every place the image may be: its ``filepath/filename``,
    then, for a COCO 2014 name, the 2017 name (``000000123456.jpg``) in the same folder, in
    ``train2017/``, ``val2017/`` and the root itself. Empty when ``filename`` is missing."""
    rel = image_relpath(e)
    if rel is None:
        return []
    out = [(BY_FILENAME, rel)]
    m = _COCO2014.match(e["filename"])
    if m:
        name = f"{m.group(1)}.jpg"
        folder = e.get("filepath") if isinstance(e.get("filepath"), str) else ""
        rels = [posixpath.join(folder, name)] if folder else []
        rels += [f"{d}/{name}" for d in _COCO2017_DIRS if d != folder] + [name]
        out += [(BY_COCO2017_NAME, r) for r in rels]
    return out


def load_proposals(path: str) -> dict[str, list]:
    """``{"<image id>": [[x1, y1, x2, y2], ...]}``."""
    d = load_json(path, "no such proposals file")
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected an object mapping image id -> list of boxes")
    return d


def proposal_key(key: Any) -> str:
    """A proposals key or image name in one form: a number without leading zeros
    (``"000000123"``, ``"123.jpg"``, ``"COCO_val2014_000000000123.jpg"`` -> ``"123"``), else the
    name without its extension (``"abc.jpg"`` -> ``"abc"``)."""
    stem = posixpath.splitext(posixpath.basename(str(key)))[0]
    m = re.fullmatch(r"(?:COCO_(?:train|val|test)2014_)?(\d+)", stem)
    return str(int(m.group(1))) if m else stem


class Proposals:
    """Detection boxes by image: the file's keys may be the split file's image ids (``cocoid``,
    else ``imgid``) or file names (``COCO_val2014_000000123.jpg``, ``000000123.jpg``,
    ``1000092795.jpg``), with or without leading zeros or extension. Remembers which keys it
    matched."""

    def __init__(self, boxes: dict[str, list], path: str):
        self.path = path
        self.by_key: dict[str, tuple[str, list]] = {proposal_key(k): (k, v) for k, v in boxes.items()}
        self.keys = len(boxes)
        self.matched: set[str] = set()

    def boxes_for(self, e: dict) -> list | None:
        """The boxes of split-file image ``e``: by its id, else by its file name; None when
        the file has none for it."""
        for key in (image_id_of(e), e.get("filename")):
            if key is not None and proposal_key(key) in self.by_key:
                original, boxes = self.by_key[proposal_key(key)]
                self.matched.add(original)
                return boxes
        return None

    def check_any_match(self, json_path: str) -> None:
        """DataError when none of the file's keys matches an image of the split file."""
        if self.keys and not self.matched:
            examples = ", ".join(repr(v[0]) for v in list(self.by_key.values())[:3])
            raise DataError(f"{self.path}: none of its {self.keys} keys (e.g. {examples}) matches an image of "
                            f"{json_path}; keys must be the images' cocoid (else imgid) or file names")
