"""Files at the bottom of the package, on a local path or any fsspec URL (``memory://``,
``s3://``...): small JSON files read whole, atomic writes, and the one local-vs-remote check.

Small JSON files (manifests, vocabularies, split and box files) are read whole here, with
errors that name the file and, for bad JSON, the line and column; large inputs stream through
:mod:`dvsa.data.jsonstream` instead. Writes go to a temporary name first and are renamed into
place, so a reader never sees half a file and a killed writer leaves the old one.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from dvsa.errors import DataError


def load_json(path: str, missing: str = "no such file") -> Any:
    """``path`` parsed. A missing file is ``DataError("<path>: <missing>")``; invalid JSON and
    text that is not UTF-8 are DataErrors naming where in the file."""
    try:
        with fsspec.open(str(path), "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: {missing}") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a JSON file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def temporary_name(path: str) -> str:
    """A sibling of ``path`` to write before renaming: ``path.tmp-1a2b3c4d``."""
    return f"{path}.tmp-{uuid.uuid4().hex[:8]}"


def write_bytes_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    tmp = temporary_name(path)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_json_atomic(fs: AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, json.dumps(obj, indent=1, sort_keys=False).encode())


@dataclass(frozen=True)
class Folder:
    """A directory on the local disk or behind an fsspec URL: its filesystem and path there."""

    fs: AbstractFileSystem
    path: str

    @classmethod
    def of(cls, root_or_url: str) -> "Folder":
        fs, path = fsspec.core.url_to_fs(str(root_or_url))
        return cls(fs, path.rstrip("/") or "/")

    @property
    def is_local(self) -> bool:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "file" in protocols

    def file(self, name: str) -> str:
        """The path of ``name`` in this folder, for ``self.fs``."""
        return posixpath.join(self.path, name)

    def url(self, name: str) -> str:
        """What another process opens for ``name``: a plain path locally, else the URL
        (``memory://x/name``: a bare path would mean a local file there)."""
        path = self.file(name)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def make(self) -> None:
        self.fs.makedirs(self.path, exist_ok=True)
