"""WebDataset shards: ``{split}-{NNNNNN}.tar`` holding ``KEY.jpg`` + ``KEY.json`` per image,
beside ``manifest.json`` and ``vocab.json`` (DESIGN.md's shard contract).

Writing goes through fsspec, so the output may be a local directory or any fsspec URL
(``memory://``, ``file://``, ``s3://`` with s3fs...). Every shard is written under a temporary
name and renamed into place once complete, so a reader never sees a half-written shard; the
writer records each shard's size and sha256 as it writes. ``manifest.json`` and ``vocab.json``
are :mod:`dvsa.data.manifest`'s.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from typing import IO, Any, Iterable, Iterator, Mapping, NamedTuple

import fsspec
from fsspec import AbstractFileSystem

from dvsa.data.manifest import MANIFEST, VOCAB, Manifest, ShardRecord
from dvsa.errors import DataError
from dvsa.files import Folder, temporary_name
from dvsa.text import Vocab

SPLITS = ("train", "val", "test")
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<num>\d{6,})\.tar$")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def shard_temporary_name(name: str) -> str:
    """Where a shard is written before its rename: ``.train-004002.tar.tmp-1a2b3c4d``."""
    return temporary_name(f".{name}")


class ChecksummedFile:
    """A write-only file that counts and hashes (sha256) the bytes going through it."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self.f.close()

    def record(self, name: str, split: str, samples: int) -> ShardRecord:
        return ShardRecord(name, split, samples, self.size, self.sha256.hexdigest())


class _OpenShard:
    """The shard being written: a tar stream into a checksummed temporary file."""

    def __init__(self, fs: AbstractFileSystem, root: str, name: str):
        self.name = name
        self.tmp = posixpath.join(root, shard_temporary_name(name))
        self.file = ChecksummedFile(fs.open(self.tmp, "wb"))
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[call-overload]
        self.samples = 0
        self.bytes = 0

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0  # deterministic shards: same input -> same bytes
        # header, data and padding written straight (TarFile.addfile copies through 16 KiB reads);
        # TarFile still writes the end-of-archive blocks on close.
        header = info.tobuf(self.tar.format, self.tar.encoding, self.tar.errors)
        pad = -len(data) % tarfile.BLOCKSIZE
        self.file.write(header)
        self.file.write(data)
        if pad:
            self.file.write(b"\0" * pad)
        self.tar.offset += len(header) + len(data) + pad

    def close(self) -> None:
        self.tar.close()
        self.file.close()


class ShardWriter:
    """Writes samples into ``{split}-{NNNNNN}.tar`` files of about ``shard_bytes`` each.

    Shard numbers start at ``first_number`` and increase by one; at most ``max_shards`` are
    allowed (the caller reserves a number range per chunk of work). Each shard is buffered
    under a temporary name and renamed on completion. ``shards`` lists what was written.
    """

    def __init__(self, root: str, split: str, shard_bytes: int, first_number: int = 0,
                 max_shards: int | None = None):
        folder = Folder.of(root)
        folder.make()
        self.fs, self.root = folder.fs, folder.path
        self.split = split
        self.shard_bytes = int(shard_bytes)
        self.next_number = first_number
        self.max_shards = max_shards
        self.limit = None if max_shards is None else first_number + max_shards
        self.shards: list[ShardRecord] = []
        self._open: _OpenShard | None = None

    def _next_shard(self) -> _OpenShard:
        if self.limit is not None and self.next_number >= self.limit:
            raise DataError(f"more than {self.max_shards} {self.split} shards in one chunk: "
                            "raise --shard-bytes or lower --chunk-images")
        self.next_number += 1
        return _OpenShard(self.fs, self.root, shard_name(self.split, self.next_number - 1))

    def write(self, key: str, jpg: bytes, meta: dict) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._open is None:
            self._open = self._next_shard()
        shard = self._open
        body = json.dumps(meta, separators=(",", ":")).encode()
        shard.add(f"{key}.jpg", jpg)
        shard.add(f"{key}.json", body)
        shard.samples += 1
        shard.bytes += len(jpg) + len(body) + 3 * 512
        if shard.bytes >= self.shard_bytes:
            self._finish()

    def _finish(self) -> None:
        shard, self._open = self._open, None
        if shard is None:
            return
        shard.close()
        self.fs.mv(shard.tmp, posixpath.join(self.root, shard.name))
        self.shards.append(shard.file.record(shard.name, self.split, shard.samples))

    def close(self) -> list[ShardRecord]:
        self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (its temporary file is removed)."""
        shard, self._open = self._open, None
        if shard is not None:
            try:
                shard.close()
            finally:
                if self.fs.exists(shard.tmp):
                    self.fs.rm(shard.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------- readers


def list_shards(root: str, split: str | None = None) -> list[str]:
    """Shard URLs (or local paths) under ``root`` for ``split`` (all splits if None), sorted
    by name. Uses the manifest when there is one, else the directory listing."""
    folder = Folder.of(root)
    if folder.fs.exists(folder.file(MANIFEST)):
        names = [s.name for s in Manifest.read(root).shards]
    elif folder.fs.exists(folder.path):
        names = [posixpath.basename(p) for p in folder.fs.ls(folder.path, detail=False)]
    else:
        raise DataError(f"{root}: no such shard directory")
    out = []
    for n in sorted(names):
        m = SHARD_RE.match(n)
        if m and (split is None or m.group("split") == split):
            out.append(folder.url(n))
    return out


def iter_tar(url: str) -> Iterator[tuple[str, bytes, dict]]:
    """``(key, jpg_bytes, meta)`` for each sample of one shard, in order."""
    with fsspec.open(url, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
        except tarfile.TarError as e:
            raise DataError(f"{url}: not a tar file ({e})") from None
        key, parts = None, {}
        try:
            for member in tar:
                if not member.isfile():
                    continue
                k, _, ext = member.name.partition(".")
                if key is not None and k != key:
                    yield _sample(url, key, parts)
                    parts = {}
                key = k
                member_file = tar.extractfile(member)   # a regular file: never None
                parts[ext] = member_file.read() if member_file is not None else b""
        except tarfile.TarError as e:
            raise DataError(f"{url}: truncated or corrupt tar ({e})") from None
        if key is not None:
            yield _sample(url, key, parts)


def _sample(url: str, key: str, parts: dict) -> tuple[str, bytes, dict]:
    if "json" not in parts:
        raise DataError(f"{url}: sample {key!r} has no .json member")
    return key, parts.get("jpg", b""), json.loads(parts["json"])


def iter_samples(root_or_urls, split: str | None = None) -> Iterator[tuple[str, bytes, dict]]:
    """Every sample of a shard directory (optionally one split) or of a list of shard URLs."""
    if isinstance(root_or_urls, (list, tuple)):
        urls: Iterable[str] = root_or_urls
    elif str(root_or_urls).endswith(".tar"):
        urls = [str(root_or_urls)]
    else:
        urls = list_shards(str(root_or_urls), split)
    for url in urls:
        yield from iter_tar(url)


def load_vocab(root: str):
    return Vocab.load(Folder.of(root).url(VOCAB))


# --------------------------------------------------------------------------- Ray Data rows

BAD_JSON = "bad_json"


class RawSample(NamedTuple):
    """One row of ``read_webdataset(decoder=None)``: the sample key, the payload member
    (``.jpg``, or ``.npy`` of feature shards; ``b""`` when absent) and the ``.json`` member
    parsed; ``meta`` is None when that member is absent or not a JSON object, and ``error``
    then says why (``""`` when it parsed)."""

    key: str
    data: bytes
    meta: dict | None
    error: str


def parse_row(batch: Mapping[str, Any], i: int, payload: str = "jpg") -> RawSample:
    """Row ``i`` of a raw ``map_batches`` batch (``__key__``, ``payload`` and ``json``
    columns); the callers drop a row whose ``meta`` is None as :data:`BAD_JSON`."""
    meta, error = None, ""
    raw_meta = _member(batch, "json", i)
    try:
        meta = json.loads(raw_meta) if raw_meta else None
    except (ValueError, UnicodeDecodeError) as e:
        error = str(e)
    if meta is None and not error:
        error = "no .json member"
    elif meta is not None and not isinstance(meta, dict):
        meta, error = None, "not an object"
    return RawSample(str(batch["__key__"][i]), _member(batch, payload, i), meta, error)


def _member(batch: Mapping[str, Any], column: str, i: int) -> bytes:
    values = batch.get(column)
    value = None if values is None else values[i]
    if value is None or isinstance(value, float):   # no such member (pandas fills NaN)
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if hasattr(value, "tobytes"):          # a numpy array of the bytes
        return value.tobytes()
    return bytes(value)
