"""The shard-set contract (DESIGN.md), written and read here only.

A shard set is a directory (or fsspec URL) of ``{split}-NNNNNN.tar`` shards beside
``manifest.json`` and ``vocab.json``; a feature-shard set holds ``features.json`` instead of
the manifest. :class:`Manifest` is ``manifest.json`` as one typed object:

- ``format``: :data:`FORMAT`; ``source`` (vg, karpathy, snippets); ``params`` used;
- the :class:`Tally`: samples in and dropped, by kind (images, regions, sentences) and reason;
  with the per-split counts written (:class:`SplitCounts`) it keeps inputs = written + dropped,
  checked before every write (:meth:`Manifest.check_balance`);
- every shard (:class:`ShardRecord`): its split, sample count, size and sha256;
- the vocabulary section, and other sections (``coco_ids``, ``info``, ``run``, ``leakage``...).

``Manifest.read`` turns every problem into a one-line :class:`DataError`, and so does
``Manifest.check_shards`` for a listed shard that is absent or of another size; ``Manifest.write``
writes ``vocab.json`` and then ``manifest.json``, each atomically. The JSON keys are those of
every shard set written so far (shard checksums added), so existing sets still read.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from dvsa.errors import DataError
from dvsa.files import Folder, load_json, write_json_atomic

if TYPE_CHECKING:
    from dvsa.text import Vocab

FORMAT = "dvsa-shards/1"
DEFAULT_SHARD_BYTES = 128 * 2**20
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
FEATURES_MANIFEST = "features.json"
KINDS = ("images", "regions", "sentences")          # what the tally counts
FEATURE_ROWS = "0: whole image, then regions in json order, then proposals"


# --------------------------------------------------------------------------- parsing helpers


class _Parser:
    """Reads one JSON document; every problem is ``DataError("<where>: <path> ...")``."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, what: str) -> DataError:
        return DataError(f"{self.where}: {what}")

    def section(self, d: Mapping, key: str, path: str = "") -> dict:
        name = f"{path}.{key}" if path else key
        if key not in d:
            raise self.fail(f"no {name!r} section")
        return self.mapping(d[key], name)

    def mapping(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(f"{path} is a {type(value).__name__}, not an object")
        return value

    def count(self, value: Any, path: str) -> int:
        if self.integer(value, path) < 0:
            raise self.fail(f"{path} is {value!r}, not a count")
        return value

    def integer(self, value: Any, path: str) -> int:
        if type(value) is not int:
            raise self.fail(f"{path} is {value!r}, not a number")
        return value

    def counts(self, d: Mapping, path: str) -> dict[str, int]:
        return {k: self.count(v, f"{path}.{k}") for k, v in self.mapping(d, path).items()}

    def sequence(self, value: Any, path: str) -> list:
        if not isinstance(value, list):
            raise self.fail(f"{path} is a {type(value).__name__}, not a list")
        return value

    def text(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{path} is {value!r}, not a string")
        return value


def _read_document(root_or_url: str, name: str, missing: str) -> tuple[dict, _Parser]:
    url = Folder.of(root_or_url).url(name)
    parser = _Parser(url)
    return parser.mapping(load_json(url, missing), "the top level"), parser


def _write_document(root_or_url: str, name: str, doc: dict, vocab: "Vocab | None") -> None:
    """``vocab.json`` (when given), then ``name``, each atomically: a set whose manifest is
    there is complete."""
    folder = Folder.of(root_or_url)
    folder.make()
    if vocab is not None:
        vocab.save(folder.url(VOCAB))
    write_json_atomic(folder.fs, folder.file(name), doc)


# --------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class ShardRecord:
    """One shard file: ``{split}-NNNNNN.tar`` with ``samples`` samples, ``size`` bytes and the
    sha256 of those bytes (None for a set written before checksums were recorded)."""

    name: str
    split: str
    samples: int
    size: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "split": self.split, "samples": self.samples}
        if self.size is not None:
            d["bytes"] = self.size
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        return d

    @classmethod
    def from_dict(cls, d: Any, parser: _Parser, path: str) -> "ShardRecord":
        d = parser.mapping(d, path)
        size, sha = d.get("bytes"), d.get("sha256")
        return cls(name=parser.text(d.get("name"), f"{path}.name"), split=parser.text(d.get("split"), f"{path}.split"),
                   samples=parser.count(d.get("samples"), f"{path}.samples"),
                   size=None if size is None else parser.count(size, f"{path}.bytes"),
                   sha256=None if sha is None else parser.text(sha, f"{path}.sha256"))


def shards_from_dicts(records: list[dict], where: str) -> list[ShardRecord]:
    """Shard records kept as JSON (a chunk's completion record) back as :class:`ShardRecord`."""
    return _shards(records, _Parser(where))


def _shards(value: Any, parser: _Parser) -> list[ShardRecord]:
    return [ShardRecord.from_dict(d, parser, f"shards[{i}]") for i, d in enumerate(parser.sequence(value, "shards"))]


@dataclass
class Tally:
    """Samples in and samples dropped, by kind (images, regions, sentences) and reason."""

    inputs: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(default_factory=lambda: {k: Counter() for k in KINDS})

    def count_in(self, images: int = 0, regions: int = 0, sentences: int = 0) -> None:
        self.inputs.update(images=images, regions=regions, sentences=sentences)

    def drop(self, reason: str, images: int = 0, regions: int = 0, sentences: int = 0) -> None:
        for kind, n in (("images", images), ("regions", regions), ("sentences", sentences)):
            if n:
                self.dropped.setdefault(kind, Counter())[reason] += n

    def reject(self, reason: str, images: int = 0, regions: int = 0, sentences: int = 0) -> None:
        """Counted in and dropped at once (what a reader drops before handing samples on)."""
        self.count_in(images, regions, sentences)
        self.drop(reason, images, regions, sentences)

    def add(self, other: "Tally") -> None:
        self.inputs.update(other.inputs)
        for kind, reasons in other.dropped.items():
            self.dropped.setdefault(kind, Counter()).update(reasons)

    def dropped_total(self, kind: str) -> int:
        return sum(self.dropped.get(kind, {}).values())

    def inputs_dict(self) -> dict[str, int]:
        return {k: self.inputs[k] for k in KINDS}

    def dropped_dict(self) -> dict[str, dict[str, int]]:
        """By kind, the reasons that dropped something, sorted by name."""
        return {kind: {r: n for r, n in sorted(reasons.items()) if n} for kind, reasons in self.dropped.items()}

    def to_dict(self) -> dict:
        return {"inputs": self.inputs_dict(), "dropped": self.dropped_dict()}

    @classmethod
    def from_dict(cls, d: Mapping, where: str) -> "Tally":
        """Of a chunk's completion record (``inputs`` and ``dropped`` as :meth:`to_dict` writes)."""
        parser = _Parser(where)
        return cls._parse(parser.section(d, "inputs"), parser.section(d, "dropped"), parser)

    @classmethod
    def _parse(cls, inputs: dict, dropped: dict, parser: _Parser) -> "Tally":
        tally = cls(inputs=Counter({k: parser.count(inputs.get(k, 0), f"inputs.{k}") for k in KINDS}))
        for kind, reasons in dropped.items():
            tally.dropped[kind] = Counter(parser.counts(reasons, f"dropped.{kind}"))
        return tally


@dataclass
class SplitCounts:
    """What one split holds: images, regions, region groups and sentences written."""

    images: int = 0
    regions: int = 0
    groups: int = 0
    sentences: int = 0

    def add(self, images: int = 0, regions: int = 0, groups: int = 0, sentences: int = 0) -> None:
        self.images += images
        self.regions += regions
        self.groups += groups
        self.sentences += sentences

    def merge(self, other: "SplitCounts") -> None:
        self.add(other.images, other.regions, other.groups, other.sentences)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, parser: _Parser, path: str) -> "SplitCounts":
        d = parser.mapping(d, path)
        return cls(**{f.name: parser.count(d.get(f.name, 0), f"{path}.{f.name}") for f in dataclasses.fields(cls)})


def split_counts_from_dicts(d: Mapping[str, Any], where: str) -> dict[str, SplitCounts]:
    parser = _Parser(where)
    return {s: SplitCounts.from_dict(c, parser, f"counts.{s}") for s, c in d.items()}


@dataclass(frozen=True)
class VocabSection:
    """The manifest's summary of ``vocab.json``."""

    size: int
    min_count: int
    train_captions: int

    @classmethod
    def of(cls, vocab: "Vocab") -> "VocabSection":
        return cls(size=len(vocab), min_count=vocab.min_count, train_captions=vocab.num_captions)

    @classmethod
    def from_dict(cls, d: Any, parser: _Parser) -> "VocabSection":
        d = parser.mapping(d, "vocab")
        return cls(**{f.name: parser.count(d.get(f.name), f"vocab.{f.name}") for f in dataclasses.fields(cls)})


# --------------------------------------------------------------------------- the manifest

# the top-level sections Manifest interprets; any other is kept as it is (Manifest.sections)
_SECTIONS = {"format", "source", "params", "inputs", "written", "splits", "shards", "dropped", "info", "vocab",
             "coco_ids"}


@dataclass
class Manifest:
    """``manifest.json`` of a shard set (module doc). ``input_details`` are the ``inputs``
    entries beside the counts (files read, bytes read, notes); ``sections`` the top-level
    sections this module does not interpret (``run``, ``leakage``, ``worker_max_rss_mb``...),
    kept as they are. ``shards`` are kept sorted by name."""

    source: str
    params: dict[str, Any]
    tally: Tally
    splits: dict[str, SplitCounts]
    shards: list[ShardRecord]
    vocab: VocabSection | None = None
    info: dict[str, Any] = field(default_factory=dict)
    coco_ids: dict[str, list[int]] = field(default_factory=dict)
    input_details: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def __post_init__(self) -> None:
        self.shards = sorted(self.shards, key=lambda s: s.name)

    # ----------------------------------------------------------------- accessors
    def split_count(self, split: str, what: str) -> int:
        """``images``, ``regions``, ``groups``, ``sentences`` or ``shards`` of ``split`` (0 when
        the set has no such split)."""
        if what == "shards":
            return len(self.shards_of(split))
        counts = self.splits.get(split)
        return 0 if counts is None else getattr(counts, what)

    def shards_of(self, split: str) -> list[ShardRecord]:
        return [s for s in self.shards if s.split == split]

    @property
    def written(self) -> dict[str, int]:
        return {k: sum(getattr(c, k) for c in self.splits.values()) for k in KINDS}

    def dropped(self, kind: str) -> dict[str, int]:
        """Drops of ``kind`` by reason (only the reasons that dropped something)."""
        return self.tally.dropped_dict().get(kind, {})

    def check_balance(self) -> None:
        """DataError unless inputs = written + dropped for images, regions and sentences, and
        the shards' sample counts add up to the images written."""
        written = self.written
        for kind in KINDS:
            n_in, n_dropped = self.tally.inputs[kind], self.tally.dropped_total(kind)
            if n_in != written[kind] + n_dropped:
                raise DataError(f"manifest does not balance for {kind}: {n_in} in, "
                                f"{written[kind]} written + {n_dropped} dropped")
        in_shards = sum(s.samples for s in self.shards)
        if in_shards != written["images"]:
            raise DataError(f"manifest: shards hold {in_shards} samples but {written['images']} images were written")

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        splits = {s: {**c.to_dict(), "shards": self.split_count(s, "shards")} for s, c in self.splits.items()}
        d = {
            "format": self.format,
            "source": self.source,
            "params": self.params,
            "inputs": {**self.tally.inputs_dict(), **self.input_details},
            "written": self.written,
            "splits": splits,
            "shards": [s.to_dict() for s in self.shards],
            "dropped": self.tally.dropped_dict(),
            "info": self.info,
        }
        if self.vocab is not None:
            d["vocab"] = dataclasses.asdict(self.vocab)
        d["coco_ids"] = self.coco_ids
        return {**d, **self.sections}

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "Manifest":
        return cls._parse(d, _Parser(where))

    @classmethod
    def _parse(cls, d: dict, p: _Parser) -> "Manifest":
        fmt = d.get("format")
        if fmt != FORMAT:
            raise p.fail(f"format is {fmt!r}, not {FORMAT!r} (not a shard set this dvsa reads)")
        inputs = p.section(d, "inputs")
        coco_ids = p.mapping(d.get("coco_ids", {}), "coco_ids")
        return cls(
            source=p.text(d.get("source"), "source"),
            params=p.section(d, "params"),
            tally=Tally._parse(inputs, p.section(d, "dropped"), p),
            splits={s: SplitCounts.from_dict(c, p, f"splits.{s}") for s, c in p.section(d, "splits").items()},
            shards=_shards(d.get("shards"), p),
            vocab=None if d.get("vocab") is None else VocabSection.from_dict(d["vocab"], p),
            info=p.mapping(d.get("info", {}), "info"),
            coco_ids={s: p.sequence(ids, f"coco_ids.{s}") for s, ids in coco_ids.items()},
            input_details={k: v for k, v in inputs.items() if k not in KINDS},
            sections={k: v for k, v in d.items() if k not in _SECTIONS},
        )

    @classmethod
    def read(cls, root_or_url: str) -> "Manifest":
        """``manifest.json`` of the shard set at ``root_or_url``; every problem (no such file,
        not JSON, not an object, a count that is not a count, another format) is one
        DataError line naming the file."""
        d, parser = _read_document(root_or_url, MANIFEST, "no such file (run `dvsa prepare` first)")
        return cls._parse(d, parser)

    def check_shards(self, root_or_url: str) -> None:
        """DataError (one line, naming the first) when a shard this manifest lists is not in
        ``root_or_url`` or has another size than recorded (one listing; no file is read)."""
        folder = Folder.of(root_or_url)
        try:
            sizes = {posixpath.basename(e["name"]): e.get("size") for e in folder.fs.ls(folder.path, detail=True)}
        except FileNotFoundError:
            raise DataError(f"{root_or_url}: no such shard directory") from None
        absent = [s.name for s in self.shards if s.name not in sizes]
        redo = f"re-run the `dvsa {'snippets' if self.source == 'snippets' else 'prepare'}` command that wrote it"
        if absent:
            raise DataError(f"{folder.url(MANIFEST)}: lists {len(absent)} shard(s) not in {root_or_url} "
                            f"(first: {absent[0]}); {redo}")
        for s in self.shards:
            if s.size is not None and sizes[s.name] != s.size:
                raise DataError(f"{folder.url(MANIFEST)}: {s.name} has {sizes[s.name]} bytes, the manifest says "
                                f"{s.size} (truncated or replaced?); {redo}")

    def write(self, root_or_url: str, vocab: "Vocab | None" = None) -> None:
        """Check the balance, then write ``vocab.json`` (when given; the vocab section is set
        to describe it) and ``manifest.json`` under ``root_or_url``, each atomically."""
        if vocab is not None:
            self.vocab = VocabSection.of(vocab)
        self.check_balance()
        _write_document(root_or_url, MANIFEST, self.to_dict(), vocab)


# --------------------------------------------------------------------------- feature shards


@dataclass
class FeatureSplit:
    """Feature samples written for one split and the samples skipped, by reason."""

    samples: int
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class FeatureManifest:
    """``features.json`` of a feature-shard set (``dvsa features``): the frozen CNN's settings,
    per split the samples written and skipped, every shard."""

    feat_dim: int
    image_size: int
    dtype: str
    source: str                     # the image shard set the features were computed from
    seed: int
    model: dict[str, Any]
    splits: dict[str, FeatureSplit]
    shards: list[ShardRecord]
    rows: str = FEATURE_ROWS

    def shards_of(self, split: str) -> list[ShardRecord]:
        return [s for s in self.shards if s.split == split]

    def to_dict(self) -> dict:
        splits = {s: {"samples": c.samples, "shards": len(self.shards_of(s)), "skipped": c.skipped}
                  for s, c in self.splits.items()}
        return {"feat_dim": self.feat_dim, "image_size": self.image_size, "dtype": self.dtype, "source": self.source,
                "seed": self.seed, "model": self.model, "rows": self.rows, "splits": splits,
                "shards": [s.to_dict() for s in self.shards]}

    @classmethod
    def read(cls, root_or_url: str) -> "FeatureManifest":
        d, p = _read_document(root_or_url, FEATURES_MANIFEST, "no such file (run `dvsa features` first)")
        splits = {}
        for s, c in p.section(d, "splits").items():
            c = p.mapping(c, f"splits.{s}")
            splits[s] = FeatureSplit(p.count(c.get("samples"), f"splits.{s}.samples"),
                                     p.counts(c.get("skipped", {}), f"splits.{s}.skipped"))
        return cls(feat_dim=p.count(d.get("feat_dim"), "feat_dim"),
                   image_size=p.count(d.get("image_size"), "image_size"),
                   dtype=p.text(d.get("dtype"), "dtype"), source=p.text(d.get("source"), "source"),
                   seed=p.integer(d.get("seed", 0), "seed"), model=p.mapping(d.get("model", {}), "model"),
                   splits=splits, shards=_shards(d.get("shards"), p), rows=d.get("rows", FEATURE_ROWS))

    def write(self, root_or_url: str, vocab: "Vocab") -> None:
        """``vocab.json`` (the image shards' vocabulary, for training on the features) and
        ``features.json`` under ``root_or_url``, each atomically."""
        _write_document(root_or_url, FEATURES_MANIFEST, self.to_dict(), vocab)
