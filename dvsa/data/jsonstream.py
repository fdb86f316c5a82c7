"""Streaming JSON with ijson (C backend when available), errors naming file and position."""

from __future__ import annotations

import io
from typing import Any, Generator

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


def _parser_words(e: Exception) -> str:
    """yajl's message (bytes in the C backend) as text: its first line and the context line."""
    raw = e.args[0] if e.args else ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "(right here)" not in ln]
    if not lines:
        return type(e).__name__
    return lines[0] + (f" near: {lines[1]}" if len(lines) > 1 else "")


def iter_items(path: str, prefix: str = "item") -> Generator[Any, None, None]:
    """Yield each element under ``prefix`` (ijson syntax: ``item`` = top-level list elements,
    ``images.item`` = elements of the top-level key ``images``), floats as float.

    Malformed or truncated JSON (or bytes that are not UTF-8) raises :class:`DataError` naming
    the file, the element index, how far the parser had read (it reads in blocks, so the error
    lies at most one block before that) and the parser's own words with the text around it.
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
        raise DataError(f"{path}: malformed or truncated JSON in element #{k} under '{prefix}' "
                        f"(the parser had read {counting.pos} bytes of the file): {_parser_words(e)}") from None
    finally:
        f.close()


_KINDS = {"start_array": "a list", "start_map": "an object", "string": "a string", "number": "a number",
          "boolean": "a boolean", "null": "null"}


def top_level(path: str) -> str:
    """What the document's top level is, in words: ``"a list"``, ``"an object"``, ``"a
    string"``, ...; reads only the first token. DataError for a missing, empty or non-JSON file."""
    try:
        f = fsspec.open(str(path), "rb").open()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    try:
        for _, event, _ in BACKEND.parse(f):
            return _KINDS.get(event, event)
        raise DataError(f"{path}: empty file, not JSON")
    except ijson.JSONError as e:
        raise DataError(f"{path}: not JSON: {_parser_words(e)}") from None
    finally:
        f.close()


def expect_list(path: str, what: str) -> None:
    """DataError unless the top level of ``path`` is a list (``what``: its elements, for the message)."""
    kind = top_level(path)
    if kind != "a list":
        raise DataError(f"{path}: the top level is {kind}, not a list of {what}")


def first_item(path: str, prefix: str = "item") -> Any:
    """The first element under ``prefix`` (:func:`iter_items`), or None when there is none."""
    items = iter_items(path, prefix)
    try:
        return next(items, None)
    finally:
        items.close()
