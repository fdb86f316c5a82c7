"""Visual Genome reader: ``image_data.json``, ``region_descriptions.json`` (streamed, it is
~700 MB at full size) and images under ``VG_100K/`` and ``VG_100K_2/`` (or densecap's single
``images/`` folder).

Both releases' spellings are read: v1.2 (``image_id``; regions ``region_id``, ``image_id``) and
v1.0 (``id``; regions ``id``, ``image``).
"""

from __future__ import annotations

import posixpath
from typing import Any, Iterator

import fsspec

from dvsa.data.image_files import safe_join
from dvsa.data.jsonstream import expect_list, iter_items
from dvsa.errors import DataError

VG_DIRS = ("VG_100K", "VG_100K_2")
DENSECAP_DIR = "images"           # densecap's preprocessing puts every image in one folder
IMAGE_DIRS = (*VG_DIRS, DENSECAP_DIR)
BY_IMAGE_ID, BY_URL_NAME = "image_id", "url_name"   # how an image file was found


def read_image_data(root: str) -> dict[int, dict]:
    """``{image_id: {"width", "height", "coco_id", "flickr_id", "relpath"}}`` from ``image_data.json``.

    ``relpath`` is ``<folder>/<name>`` taken from the url when it names one of the image
    folders, else None (the image is then looked up by its id only).
    """
    path = posixpath.join(str(root), "image_data.json")
    expect_list(path, '{"image_id", "url", "width", "height", ...} (VG\'s image_data.json)')
    out: dict[int, dict] = {}
    for k, e in enumerate(iter_items(path, "item")):
        if not isinstance(e, dict):
            raise DataError(f"{path}: element #{k} is not an object")
        iid = e.get("image_id", e.get("id"))
        if not isinstance(iid, int) or isinstance(iid, bool):
            raise DataError(f"{path}: element #{k} has no integer 'image_id' (got {iid!r})")
        out[iid] = {"width": e.get("width"), "height": e.get("height"), "coco_id": e.get("coco_id"),
                    "flickr_id": e.get("flickr_id"), "relpath": _url_relpath(e.get("url"))}
    return out


def _url_relpath(url: Any) -> str | None:
    if not isinstance(url, str):
        return None
    folder, name = posixpath.split(url)
    folder = posixpath.basename(folder)
    return f"{folder}/{name}" if folder in IMAGE_DIRS and name else None


def iter_region_entries(root: str) -> Iterator[tuple[int | None, list[Any], int]]:
    """``(image_id, regions, element_index)`` per element of ``region_descriptions.json``.

    ``image_id`` comes from the element's ``id`` / ``image_id`` or its first region's
    ``image_id`` (v1.0: ``image``); None when it has none (the caller drops and counts it).
    Non-list ``regions`` come back as an empty list with image_id None.
    """
    path = posixpath.join(str(root), "region_descriptions.json")
    expect_list(path, '{"id", "regions"} (VG\'s region_descriptions.json)')
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
            iid = _first_present(regions[0], "image_id", "image")
        if not isinstance(iid, int) or isinstance(iid, bool):
            iid = None
        yield iid, regions, k


def region_id_of(region: Any) -> Any:
    """A region's id: ``region_id`` (v1.2) or ``id`` (v1.0); None when it has neither."""
    return _first_present(region, "region_id", "id") if isinstance(region, dict) else None


def _first_present(d: dict, *keys: str) -> Any:
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    return None


def image_candidates(root: str, image_id: int, relpath: str | None) -> list[tuple[str, str]] | None:
    """``(how, path)`` for every place the image may be: by image id (``<id>.jpg``) in the
    url's folder, the other VG folders and ``images/``; then by the url's file name when it
    differs (a mirror whose names are not the ids). None when the url's file name is unsafe
    (``..``). Whoever reads the image takes the first that exists (a worker, not the driver)."""
    url_folder, url_name = posixpath.split(relpath) if relpath else ("", "")
    folders = ([url_folder] if url_folder else []) + [d for d in IMAGE_DIRS if d != url_folder]
    rels = [(BY_IMAGE_ID, f"{d}/{image_id}.jpg") for d in folders]
    if url_name and url_name != f"{image_id}.jpg":
        rels += [(BY_URL_NAME, f"{d}/{url_name}") for d in folders]
    out = []
    for how, rel in rels:
        p = safe_join(str(root), rel)
        if p is None:
            return None
        out.append((how, p))
    return out


def find_image(root: str, image_id: int, relpath: str | None) -> str | None:
    """The first existing candidate path/URL of the image, or None when it is in no folder."""
    for _, p in image_candidates(root, image_id, relpath) or ():
        fs, path = fsspec.core.url_to_fs(p)
        if fs.exists(path):
            return p
    return None
