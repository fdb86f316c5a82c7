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

Given a ``builder`` (a :class:`dvsa.ingest.builder.BatchBuilder`), the datasource decodes in its
read tasks instead (:func:`decoded_blocks`): each read task turns the samples of all its shards,
in read order, into blocks of exactly ``chunk`` decoded rows (fewer only where samples were
skipped, and for the task's last block), carrying a shard's last rows over into the next
shard's first chunk. Blocks of the train loop's batch size reach the consumer whole, so
``iter_batches`` hands them on without concatenating (copying) pieces of two blocks per batch.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from typing import Iterable, Iterator, Mapping, Optional, Sequence

from ray.data.datasource import FileBasedDatasource, ReadTask

from dvsa.ingest.builder import build_in_chunks
from dvsa.ingest.samples import ERROR_COLUMN, LOST_COLUMN
from dvsa.ingest.warmup import tune_ray_data

# the process that unpickles a dvsa dataset to run it (the driver, Train's split coordinator)
# runs every pass at full width from its start and hands each block on in the step that sees
# it (dvsa.ingest.warmup)
tune_ray_data()

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
                 expected: Optional[Mapping[str, int]] = None, builder=None, chunk: int = 32,
                 **file_based_kwargs):
        super().__init__(list(paths), **file_based_kwargs)
        self.suffixes = set(suffixes)
        self.expected = dict(expected or {})
        self.builder = builder
        self.chunk = int(chunk)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")

    def get_name(self) -> str:
        """``ReadShard``, or ``ReadShardDecode`` when the read tasks decode (the operator's name)."""
        return "ShardDecode" if self.builder is not None else "Shard"

    def _read_stream(self, stream, path: str) -> Iterator:
        return read_shard(stream, path, self.suffixes, self.expected.get(posixpath.basename(path)))

    def get_read_tasks(self, parallelism: int, *args, **kwargs) -> list:
        """The file-based read tasks (shard order, shuffle and grouping as FileBasedDatasource
        makes them); with a ``builder``, each one decodes its raw blocks (:func:`decoded_blocks`)."""
        tasks = super().get_read_tasks(parallelism, *args, **kwargs)
        if self.builder is None:
            return tasks
        return [ReadTask(_DecodingRead(t.read_fn, self.builder, self.chunk), t.metadata,
                         schema=t.schema, per_task_row_limit=t.per_task_row_limit) for t in tasks]


class _DecodingRead:
    """A read task's function: its raw blocks, decoded (:func:`decoded_blocks`)."""

    def __init__(self, read_fn, builder, chunk: int):
        self.read_fn, self.builder, self.chunk = read_fn, builder, chunk

    def __call__(self) -> Iterator:
        from ray.data.block import BlockAccessor

        for batch in decoded_blocks(self.read_fn(), self.builder, self.chunk):
            yield BlockAccessor.batch_to_block(batch)


def decoded_blocks(raw_blocks: Iterable, builder, chunk: int) -> Iterator[dict]:
    """Raw sample blocks (pandas frames, as :func:`read_shard` yields them, shard after shard)
    -> numpy batches built by ``builder`` from ``chunk`` samples at a time, in order
    (:func:`dvsa.ingest.builder.build_in_chunks`: a shard's last rows start the next one's
    first chunk). Marker rows go through the builder like samples (it counts them)."""
    columns = ({k: frame[k].to_numpy() for k in frame.columns} for frame in raw_blocks if len(frame))
    return build_in_chunks(columns, builder, builder.empty, chunk)


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
