"""Small JSON files read whole (manifests, vocabularies, split and box files), from a local
path or an fsspec URL, with errors that name the file and, for bad JSON, the line and column.
Large inputs stream through :mod:`dvsa.data.jsonstream` instead."""

from __future__ import annotations

import json
from typing import Any

import fsspec

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
