"""Visual Genome v1.2 reader: ``image_data.json``, ``region_descriptions.json`` (streamed, it
is ~700 MB at full size) and images under ``VG_100K/`` and ``VG_100K_2/``."""

from __future__ import annotations

import posixpath
from typing import Any, Iterator

import fsspec

from dvsa.data.jsonstream import iter_items
from dvsa.errors import DataError

IMAGE_DIRS = ("VG_100K", "VG_100K_2")


def read_image_data(root: str) -> dict[int, dict]:
    """``{image_id: {"width", "height", "coco_id", "relpath"}}`` from ``image_data.json``.

    ``relpath`` is ``<folder>/<id>.jpg`` taken from the url when it names one of the VG image
    folders, else None (the image is then looked up in both folders).
    """
    path = posixpath.join(str(root), "image_data.json")
    out: dict[int, dict] = {}
    for k, e in enumerate(iter_items(path, "item")):
        if not isinstance(e, dict):
            raise DataError(f"{path}: element #{k} is not an object")
        iid = e.get("image_id", e.get("id"))
        if not isinstance(iid, int) or isinstance(iid, bool):
            raise DataError(f"{path}: element #{k} has no integer 'image_id' (got {iid!r})")
        relpath = None
        url = e.get("url")
        if isinstance(url, str):
            folder, name = posixpath.split(url)
            folder = posixpath.basename(folder)
            if folder in IMAGE_DIRS and name:
                relpath = f"{folder}/{name}"
        out[iid] = {"width": e.get("width"), "height": e.get("height"),
                    "coco_id": e.get("coco_id"), "relpath": relpath}
    return out


def iter_region_entries(root: str) -> Iterator[tuple[int | None, list[Any], int]]:
    """``(image_id, regions, element_index)`` per element of ``region_descriptions.json``.

    ``image_id`` comes from the element's ``id`` / ``image_id`` or its first region's
    ``image_id``; None when it has none (the caller drops and counts it). Non-list ``regions``
    come back as an empty list with image_id None.
    """
    path = posixpath.join(str(root), "region_descriptions.json")
    for k, e in enumerate(iter_items(path, "item")):
        if not isinstance(e, dict):
            yield None, [], k
            continue
        regions = e.get("regions")
        if not isinstance(regions, list):
            yield None, [], k
            continue
        iid = e.get("id", e.get("image_id"))
        if iid is None and regions and isinstance(regions[0], dict):
            iid = regions[0].get("image_id")
        if not isinstance(iid, int) or isinstance(iid, bool):
            iid = None
        yield iid, regions, k


def image_candidates(root: str, image_id: int, relpath: str | None) -> list[str]:
    """Where the image may be: the url's folder first, then ``VG_100K/``, ``VG_100K_2/``.
    Whoever reads the image takes the first that exists (a worker, not the driver)."""
    rels = [relpath] if relpath else []
    rels += [f"{d}/{image_id}.jpg" for d in IMAGE_DIRS if f"{d}/{image_id}.jpg" != relpath]
    return [posixpath.join(str(root), r) for r in rels]


def find_image(root: str, image_id: int, relpath: str | None) -> str | None:
    """The first existing candidate path/URL of the image, or None when it is in neither folder."""
    for p in image_candidates(root, image_id, relpath):
        fs, path = fsspec.core.url_to_fs(p)
        if fs.exists(path):
            return p
    return None
