"""Streaming JSON with ijson (C backend when available), errors naming file and position."""

from __future__ import annotations

import io
from typing import Any, Iterator

import fsspec
import ijson

from dvsa.errors import DataError


def _backend():
    try:
        return ijson.get_backend("yajl2_c")
    except Exception:  # pragma: no cover - the pure-python backend still streams
        return ijson


BACKEND = _backend()


class _Counting(io.RawIOBase):
    """A binary reader that counts the bytes handed to the parser."""

    def __init__(self, f):
        self.f = f
        self.pos = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.pos += len(b)
        return b

    def readinto(self, buf) -> int:
        b = self.read(len(buf))
        buf[: len(b)] = b
        return len(b)


def iter_items(path: str, prefix: str = "item") -> Iterator[Any]:
    """Yield each element under ``prefix`` (ijson syntax: ``item`` = top-level list elements,
    ``images.item`` = elements of the top-level key ``images``), floats as float.

    Malformed or truncated JSON raises :class:`DataError` naming the file, the element index
    and the byte position the parser had reached.
    """
    try:
        f = fsspec.open(str(path), "rb").open()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    k = 0
    counting = _Counting(f)
    try:
        for item in BACKEND.items(counting, prefix, use_float=True):
            yield item
            k += 1
    except ijson.JSONError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: malformed or truncated JSON in element #{k} under '{prefix}' "
                        f"(parser at byte {counting.pos} of the file): {msg}") from None
    finally:
        f.close()
