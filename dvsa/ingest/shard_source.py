"""A Ray Data datasource for dvsa's WebDataset shards that survives a broken shard.

``ray.data.read_webdataset`` raises on a truncated or corrupt tar (``tarfile.ReadError``, in
one traceback per retry, the shard never named) and says nothing when a shard was cut between
two members (Python's tar reader then just stops). This datasource reads the same members with
webdataset's tar iteration and key grouping rules (:func:`tar_members`, :func:`group_samples`:
ported, because importing ``webdataset`` imports torch, seconds and ~300 MB in every fresh
Ray worker process that reads a shard), and turns both cases into data: the samples
read before the break are delivered, followed by one *marker row* (``__key__`` empty,
``__url__`` the shard, ``__error__`` what broke, ``__lost__`` how many samples were not
delivered, from the manifest's count when it has one). The batch builder counts the marker
under :data:`dvsa.ingest.samples.TRUNCATED_SHARD` and names the shard (``dvsa.ingest.builder``), so training goes
on, and ``data.max_skip_fraction`` decides whether the job may.

Blocks are pandas frames of up to :data:`ROWS_PER_BLOCK` samples, raw member bytes per column
(as ``read_webdataset(decoder=None)`` gives them); a marker row is a block of its own.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from typing import Iterable, Iterator, Mapping, Optional, Sequence

from ray.data.datasource import FileBasedDatasource

from dvsa.ingest.samples import ERROR_COLUMN, LOST_COLUMN

ROWS_PER_BLOCK = 512     # as read_webdataset: samples per pandas block

# What a broken archive raises while it is read: tarfile's errors, a stream that ends early,
# and webdataset's "duplicate file name" (two members of one key that are not adjacent)
_BROKEN = (tarfile.TarError, EOFError, OSError, ValueError)


class ShardDatasource(FileBasedDatasource):
    """``{split}-NNNNNN.tar`` shards -> rows of ``__key__``, ``__url__`` and one column of raw
    bytes per member suffix in ``suffixes``.

    ``expected``: samples per shard file name (from the manifest); a shard that delivers fewer
    ends with a marker row even when the tar reader saw no error.
    """

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths: Sequence[str], suffixes: Sequence[str],
                 expected: Optional[Mapping[str, int]] = None, **file_based_kwargs):
        super().__init__(list(paths), **file_based_kwargs)
        self.suffixes = set(suffixes)
        self.expected = dict(expected or {})

    def _read_stream(self, stream, path: str) -> Iterator:
        return read_shard(stream, path, self.suffixes, self.expected.get(posixpath.basename(path)))


def read_shard(stream, path: str, suffixes: Iterable[str], expected: Optional[int] = None) -> Iterator:
    """The pandas blocks of one shard read from ``stream``: its samples, then a marker row if the
    archive breaks off (a tar error, or fewer than ``expected`` samples)."""
    import pandas as pd

    rows: list[dict] = []
    read, error = 0, None
    try:
        for sample in group_samples(tar_members(stream), path, set(suffixes)):
            rows.append(sample)
            read += 1
            if len(rows) >= ROWS_PER_BLOCK:
                yield pd.DataFrame.from_records(rows)
                rows = []
    except _BROKEN as e:
        text = str(e).splitlines()[0] if str(e) else "unreadable"
        error = f"{type(e).__name__}: {text} (after {read} samples)"
    if rows:
        yield pd.DataFrame.from_records(rows)
    if error is None and expected is not None and read < expected:
        error = f"the archive ends after {read} of its {expected} samples"
    if error is not None:
        lost = max(1, expected - read) if expected is not None else 1
        yield pd.DataFrame.from_records([marker(path, error, lost)])


_META = re.compile(r"__[^/]*__($|/)")          # webdataset's skip_meta: __name__ members
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")   # webdataset's base_plus_ext


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of the regular files of a tar stream, in order, without webdataset's
    metadata members (``__name__``), as ``webdataset.tariterators.tar_file_iterator``."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        member = tar.extractfile(info) if info.isreg() and not _META.match(info.name) else None
        if member is not None:
            yield info.name, member.read()
        tar.members = []                          # a stream: keep no TarInfo list


def group_samples(members: Iterable[tuple[str, bytes]], path: str, suffixes: set[str]) -> Iterator[dict]:
    """Consecutive members with the same key (the name up to the first dot of its last part)
    -> one sample ``{__key__, __url__, <suffix>: bytes...}`` keeping only ``suffixes``, as
    ``webdataset.tariterators.group_by_keys``; a kept suffix twice in one sample (members of a
    key not adjacent in the tar) raises ValueError."""
    current: Optional[dict] = None
    for name, data in members:
        match = _KEY_EXT.match(name)
        if match is None:
            continue
        key, suffix = match.group(1), match.group(2).lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": path}
        if suffix in current:
            raise ValueError(f"{name}: duplicate file name in tar file {suffix}")
        if suffix in suffixes:
            current[suffix] = data
    if current is not None:
        yield current


def marker(path: str, error: str, lost: int) -> dict:
    """The row that stands for the samples a broken shard did not deliver."""
    return {"__key__": "", "__url__": path, ERROR_COLUMN: error, LOST_COLUMN: int(lost)}
