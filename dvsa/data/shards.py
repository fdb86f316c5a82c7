"""WebDataset shards: ``{split}-{NNNNNN}.tar`` holding ``KEY.jpg`` + ``KEY.json`` per image,
beside ``manifest.json`` and ``vocab.json`` (DESIGN.md's shard contract).

Writing goes through fsspec, so the output may be a local directory or any fsspec URL
(``memory://``, ``file://``, ``s3://`` with s3fs...). Every shard is written under a temporary
name and renamed into place once complete, so a reader never sees a half-written shard.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
import uuid
from typing import Iterable, Iterator

import fsspec

from dvsa.errors import DataError
from dvsa.jsonfile import load_json

MANIFEST = "manifest.json"
VOCAB = "vocab.json"
SPLITS = ("train", "val", "test")
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<num>\d{6,})\.tar$")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def _fs(root: str):
    fs, path = fsspec.core.url_to_fs(str(root))
    return fs, path.rstrip("/") or "/"


def _url(fs, path: str) -> str:
    """A URL another process can open (``memory://x`` for memory fs, plain path locally)."""
    return fs.unstrip_protocol(path) if not _is_local(fs) else path


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_json_atomic(fs, path: str, obj) -> None:
    write_bytes_atomic(fs, path, json.dumps(obj, indent=1, sort_keys=False).encode())


class ShardWriter:
    """Writes samples into ``{split}-{NNNNNN}.tar`` files of about ``shard_bytes`` each.

    Shard numbers start at ``first_number`` and increase by one; at most ``max_shards`` are
    allowed (the caller reserves a number range per chunk of work). Each shard is buffered
    under a temporary name and renamed on completion. ``shards`` lists what was written:
    ``{"name", "split", "samples", "bytes"}``.
    """

    def __init__(self, root: str, split: str, shard_bytes: int, first_number: int = 0,
                 max_shards: int | None = None):
        self.fs, self.root = _fs(root)
        self.fs.makedirs(self.root, exist_ok=True)
        self.split = split
        self.shard_bytes = int(shard_bytes)
        self.next_number = first_number
        self.max_shards = max_shards
        self.limit = None if max_shards is None else first_number + max_shards
        self.shards: list[dict] = []
        self._tar = None
        self._file = None
        self._tmp = None
        self._name = None
        self._samples = 0
        self._bytes = 0

    def _open(self) -> None:
        if self.limit is not None and self.next_number >= self.limit:
            raise DataError(f"more than {self.max_shards} {self.split} shards in one chunk: "
                            "raise --shard-bytes or lower --chunk-images")
        self._name = shard_name(self.split, self.next_number)
        self.next_number += 1
        self._tmp = posixpath.join(self.root, f".{self._name}.tmp-{uuid.uuid4().hex[:8]}")
        self._file = self.fs.open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._samples = 0
        self._bytes = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0  # deterministic shards: same input -> same bytes
        # header, data and padding written straight (TarFile.addfile copies through 16 KiB reads);
        # TarFile still writes the end-of-archive blocks on close.
        tar = self._tar
        header = info.tobuf(tar.format, tar.encoding, tar.errors)
        pad = -len(data) % tarfile.BLOCKSIZE
        self._file.write(header)
        self._file.write(data)
        if pad:
            self._file.write(b"\0" * pad)
        tar.offset += len(header) + len(data) + pad

    def write(self, key: str, jpg: bytes, meta: dict) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None:
            self._open()
        body = json.dumps(meta, separators=(",", ":")).encode()
        self._add(f"{key}.jpg", jpg)
        self._add(f"{key}.json", body)
        self._samples += 1
        self._bytes += len(jpg) + len(body) + 3 * 512
        if self._bytes >= self.shard_bytes:
            self._finish()

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        final = posixpath.join(self.root, self._name)
        size = self.fs.size(self._tmp)
        self.fs.mv(self._tmp, final)
        self.shards.append({"name": self._name, "split": self.split, "samples": self._samples, "bytes": size})
        self._tar = self._file = self._tmp = None

    def close(self) -> list[dict]:
        self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (its temporary file is removed)."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                if self.fs.exists(self._tmp):
                    self.fs.rm(self._tmp)
                self._tar = self._file = self._tmp = None

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
    fs, base = _fs(root)
    names = None
    mpath = posixpath.join(base, MANIFEST)
    if fs.exists(mpath):
        names = [s["name"] for s in load_manifest(root).get("shards", [])]
    if names is None:
        if not fs.exists(base):
            raise DataError(f"{root}: no such shard directory")
        names = [posixpath.basename(p) for p in fs.ls(base, detail=False)]
    out = []
    for n in sorted(names):
        m = SHARD_RE.match(n)
        if m and (split is None or m.group("split") == split):
            out.append(_url(fs, posixpath.join(base, n)))
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
                parts[ext] = tar.extractfile(member).read()
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


def load_manifest(root: str) -> dict:
    fs, base = _fs(root)
    return load_json(_url(fs, posixpath.join(base, MANIFEST)), "no such file (run `dvsa prepare` first)")


def load_vocab(root: str):
    from dvsa.text import Vocab

    fs, base = _fs(root)
    return Vocab.load(_url(fs, posixpath.join(base, VOCAB)))
