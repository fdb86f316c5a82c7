"""Image files named by an input JSON: where they may be, and reading them within limits.

A file name from a split file or ``image_data.json`` is data, not a path to trust: one that is
absolute, a URL, or has a ``..`` component is never joined to its root (:func:`safe_join`
returns None; ``dvsa prepare`` drops the image as ``unsafe_path``). Symbolic links inside a
root are followed: they are the user's own layout (an images root linking to the real COCO
folders), not something a JSON file can create.

:func:`read_image` reads only regular files (a FIFO, a device or a directory is refused as
``not_a_file`` before a byte is read, and opening never waits on a FIFO) and never more than
``max_bytes`` (``too_large``), so a hostile or mistaken input can neither hang a worker nor
fill its memory.
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Sequence

import fsspec

DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20
UNSAFE_PATH = "unsafe_path"
NOT_A_FILE = "not_a_file"
TOO_LARGE = "too_large"


class Refused(Exception):
    """An image file that is not read; ``reason`` is the drop reason (``not_a_file``,
    ``too_large``)."""

    def __init__(self, reason: str, path: str):
        super().__init__(f"{path}: {reason}")
        self.reason, self.path = reason, path


def is_safe_relpath(rel: str) -> bool:
    """True when ``rel`` is a relative path that stays under whatever it is joined to: not
    empty, not absolute, not a URL, no ``..`` component (``\\`` counts as a separator here
    too), no NUL byte."""
    if not rel or "\x00" in rel or "://" in rel:
        return False
    parts = rel.replace("\\", "/").split("/")
    return parts[0] != "" and ".." not in parts


def safe_join(root: str, rel: str) -> str | None:
    """``root/rel`` (``root`` a local path or fsspec URL), or None when ``rel`` is unsafe
    (:func:`is_safe_relpath`)."""
    if not is_safe_relpath(rel):
        return None
    return posixpath.join(root, posixpath.normpath(rel))


def read_image(paths: Sequence[str], max_bytes: int) -> tuple[int, bytes]:
    """``(index, bytes)`` of the first of ``paths`` that exists. FileNotFoundError when none
    does; :class:`Refused` when that one is not a regular file or holds more than
    ``max_bytes``; another OSError when it cannot be read."""
    for i, p in enumerate(paths):
        try:
            return i, (_read_remote(p, max_bytes) if "://" in p else _read_local(p, max_bytes))
        except FileNotFoundError:
            continue
    raise FileNotFoundError(paths[0] if paths else "no path")


def _read_local(path: str, max_bytes: int) -> bytes:
    # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; it changes
    # nothing for a regular file. The type is checked on the open descriptor (no race).
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(NOT_A_FILE, path)
        if st.st_size > max_bytes:
            raise Refused(TOO_LARGE, path)
        with open(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)       # the file may have grown since fstat
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise Refused(TOO_LARGE, path)
    return data


def _read_remote(url: str, max_bytes: int) -> bytes:
    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)                       # FileNotFoundError when absent
    if info.get("type") != "file":
        raise Refused(NOT_A_FILE, url)
    size = info.get("size")
    if size is not None and size > max_bytes:
        raise Refused(TOO_LARGE, url)
    with fs.open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Refused(TOO_LARGE, url)
    return data
