"""One chunk of images -> shards: the unit of work ``dvsa prepare`` fans out as a Ray task.

A chunk writes its own shards, numbered ``chunk * STRIDE + k`` (``train-004002.tar`` is the
third train shard of chunk 4), each atomically, and last a completion record
``_chunks/chunk-NNNNNN.json`` holding what it wrote, counted and dropped. A re-run skips
chunks whose record matches (same parameters, same images) while the shards it lists are on
disk as recorded (:func:`shard_problem`: size, and sha256 unless told not to); an unfinished
or damaged chunk first removes whatever is left of it, then is redone, so no sample is lost or
duplicated.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import os
import posixpath
import resource
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from typing import Sequence

import fsspec

from dvsa.boxes import clip_box, is_degenerate
from dvsa.data.groups import region_groups
from dvsa.data.image_files import DEFAULT_MAX_IMAGE_BYTES, Refused, read_image
from dvsa.data.images import BadImage, StoredImage, prepare_image
from dvsa.data.manifest import ShardRecord, SplitCounts, Tally, split_counts_from_dicts
from dvsa.data.shards import SHARD_RE, ShardWriter
from dvsa.data.vg import region_id_of
from dvsa.files import write_json_atomic
from dvsa.text import clean_caption

STRIDE = 1000          # shard numbers reserved per chunk (and split)
RECORDS = "_chunks"
ASPECT_TOLERANCE = 0.02  # file vs image_data.json size: the same aspect ratio within 2% is a resized copy


def record_path(base: str, chunk: int) -> str:
    return posixpath.join(base, RECORDS, f"chunk-{chunk:06d}.json")


def _file_state(paths) -> tuple:
    """(size, mtime_ns) of the first local file of ``paths`` that exists; () for URLs or none."""
    for p in paths or ():
        if "://" in p:
            return ()
        try:
            st = os.stat(p)
        except OSError:
            continue
        return (st.st_size, st.st_mtime_ns)
    return ()


def fingerprint(params: dict, items: list[dict]) -> str:
    """What a chunk's output depends on: the parameters, every item's metadata (ids, split,
    phrases, boxes, sentences, proposals: any edit of the input JSON changes it) and, for local
    files, each image's size and modification time. A re-run redoes a chunk whose fingerprint
    differs from its completion record's."""
    h = hashlib.sha1(json.dumps(params, sort_keys=True).encode())
    for it in items:
        try:
            h.update(marshal.dumps(it, 2))   # version 2: no back-references, so equal data -> equal bytes
        except ValueError:                   # a type marshal does not write
            h.update(repr(it).encode())
        h.update(repr(_file_state(it.get("paths"))).encode())
    return h.hexdigest()


def read_record(out: str, chunk: int) -> dict | None:
    fs, base = fsspec.core.url_to_fs(out)
    p = record_path(base, chunk)
    try:
        with fs.open(p, "r") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _clean_stale(fs, base: str, chunk: int) -> int:
    """Remove shards of this chunk and temp files a killed run left behind."""
    removed = 0
    if not fs.exists(base):
        return 0
    for p in fs.ls(base, detail=False):
        name = posixpath.basename(p)
        if name.startswith(".") and ".tmp-" in name:  # ".train-004002.tar.tmp-1a2b3c4d"
            name = name[1:].split(".tmp-")[0]
        m = SHARD_RE.match(name)
        if m and int(m.group("num")) // STRIDE == chunk:
            fs.rm(p)
            removed += 1
    return removed


def _number(v) -> bool:
    t = type(v)
    return t is int or t is float


def shard_sizes(fs, base: str) -> dict[str, int]:
    """``{file name: size}`` of the shards under ``base`` (one listing)."""
    if not fs.exists(base):
        return {}
    return {posixpath.basename(e["name"]): e.get("size") for e in fs.ls(base, detail=True)
            if SHARD_RE.match(posixpath.basename(e["name"]))}


def shard_problem(fs, base: str, shards: Sequence[dict], sizes: dict[str, int], check_sha256: bool) -> str | None:
    """Why the shards a completion record lists are not on disk as recorded (None when they
    are): a missing file, another size, or (``check_sha256``: each file is read again) other
    bytes. ``sizes``: :func:`shard_sizes` of ``base``."""
    for s in shards:
        name = s.get("name") if isinstance(s, dict) else None
        if not isinstance(name, str):
            return f"a shard record without a name: {s!r}"
        size, sha = s.get("bytes"), s.get("sha256")
        if name not in sizes:
            return f"{name} is missing"
        if size is not None and sizes[name] != size:
            return f"{name} has {sizes[name]} bytes, its record says {size}"
        if check_sha256 and sha and _sha256(fs, posixpath.join(base, name)) != sha:
            return f"{name}'s sha256 differs from its record"
    return None


def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class DropLog:
    """Image drops by split and reason, and per split the first path tried for each reason:
    what the end of ``dvsa prepare`` reports when a split loses most of its images."""

    by_split: dict[str, Counter] = field(default_factory=dict)
    examples: dict[str, dict[str, str]] = field(default_factory=dict)

    def note(self, split: str | None, reason: str, path: str | None) -> None:
        if split is None:
            return
        self.by_split.setdefault(split, Counter())[reason] += 1
        if path is not None:
            self.examples.setdefault(split, {}).setdefault(reason, path)

    def example(self, reason: str, split: str | None = None) -> str | None:
        """The first path tried among the images ``reason`` dropped from ``split`` (from any
        split when ``split`` is None)."""
        splits = [split] if split is not None else sorted(self.examples)
        return next((self.examples[s][reason] for s in splits if reason in self.examples.get(s, {})), None)

    def add(self, other: "DropLog") -> None:
        for split, reasons in other.by_split.items():
            self.by_split.setdefault(split, Counter()).update(reasons)
        for split, paths in other.examples.items():
            for reason, path in paths.items():
                self.examples.setdefault(split, {}).setdefault(reason, path)

    def to_dict(self) -> dict:
        return {"by_split": {s: dict(sorted(c.items())) for s, c in sorted(self.by_split.items())},
                "examples": {s: dict(sorted(p.items())) for s, p in sorted(self.examples.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "DropLog":
        return cls({s: Counter(c) for s, c in d.get("by_split", {}).items()},
                   {s: dict(p) for s, p in d.get("examples", {}).items()})


@dataclass
class ChunkCounts:
    """What a chunk counts as it goes: the tally (in / dropped), what each split got, notes
    (``info``), and the train split's tokens and captions for the vocabulary."""

    tally: Tally = field(default_factory=Tally)
    splits: dict[str, SplitCounts] = field(default_factory=dict)
    info: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)
    train_captions: int = 0
    coco_ids: dict[str, list] = field(default_factory=dict)
    bytes_in: int = 0
    drops: DropLog = field(default_factory=DropLog)

    def drop_item(self, it: dict, reason: str, path: str | None = None) -> None:
        """The whole image goes, with its regions and sentences (``path``: the file tried)."""
        self.tally.drop(reason, images=1, regions=len(it.get("regions") or ()),
                        sentences=len(it.get("sentences") or ()))
        self.drops.note(it.get("split"), reason, path)

    def drop_image(self, it: dict, reason: str) -> None:
        """The image goes; its regions and sentences were dropped (and counted) one by one."""
        self.tally.drop(reason, images=1)
        self.drops.note(it.get("split"), reason, None)

    def written(self, meta: dict) -> None:
        split = meta["split"]
        regions, sentences = meta["regions"], meta["sentences"]
        self.splits.setdefault(split, SplitCounts()).add(images=1, regions=len(regions), groups=len(meta["groups"]),
                                                          sentences=len(sentences))
        if meta["coco_id"] is not None:
            self.coco_ids.setdefault(split, []).append(meta["coco_id"])
        if split == "train":
            self.tokens.update(chain.from_iterable(cap["tokens"] for cap in regions))
            self.tokens.update(chain.from_iterable(cap["tokens"] for cap in sentences))
            self.train_captions += len(regions) + len(sentences)

    def add_record(self, rec: dict, where: str) -> None:
        """Fold in a chunk's completion record (``where``: the record, for errors)."""
        for split, c in split_counts_from_dicts(rec["counts"], where).items():
            self.splits.setdefault(split, SplitCounts()).merge(c)
        self.tally.add(Tally.from_dict(rec, where))
        self.info.update(rec["info"])
        self.tokens.update(rec["tokens"])
        self.train_captions += rec["train_captions"]
        for split, ids in rec["coco_ids"].items():
            self.coco_ids.setdefault(split, []).extend(ids)
        self.bytes_in += rec["bytes_in"]
        self.drops.add(DropLog.from_dict(rec.get("drops", {})))

    def record(self, chunk: int, fp: str, shards: list[ShardRecord]) -> dict:
        """The completion record (JSON): what the chunk wrote, counted and dropped."""
        return {"chunk": chunk, "fingerprint": fp, "shards": [s.to_dict() for s in shards],
                "counts": {s: c.to_dict() for s, c in self.splits.items()}, **self.tally.to_dict(),
                "info": dict(self.info), "tokens": dict(self.tokens), "train_captions": self.train_captions,
                "coco_ids": self.coco_ids, "bytes_in": self.bytes_in, "drops": self.drops.to_dict(),
                "worker_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def process_chunk(chunk: int, items: list[dict], out: str, params: dict, fp: str) -> dict:
    """Write the shards of one chunk and its completion record; return the record.

    ``items``: one dict per image: ``image_id, split, source, paths (candidate files, first found wins),
    path_kinds (optional, one per path: how it was derived, counted as info found_by_<kind>),
    coco_id, meta_size ([w, h] or None), regions (raw VG dicts), sentences (raw str or None),
    proposals (list or None)``, and optionally ``file_name``, ``flickr_id`` (kept in the json).
    """
    fs, base = fsspec.core.url_to_fs(out)
    fs.makedirs(posixpath.join(base, RECORDS), exist_ok=True)
    _clean_stale(fs, base, chunk)

    counts = ChunkCounts()
    writers: dict[str, ShardWriter] = {}
    try:
        for it in items:
            counts.tally.count_in(images=1, regions=len(it.get("regions") or ()),
                                  sentences=len(it.get("sentences") or ()))
            sample = build_sample(it, params, counts)
            if sample is None:
                continue
            jpg, meta = sample
            split = meta["split"]
            if split not in writers:
                writers[split] = ShardWriter(out, split, params["shard_bytes"], first_number=chunk * STRIDE,
                                             max_shards=STRIDE)
            writers[split].write(str(it["image_id"]), jpg, meta)
            counts.written(meta)
        shards = [s for split in sorted(writers) for s in writers[split].close()]
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    record = counts.record(chunk, fp, shards)
    write_json_atomic(fs, record_path(base, chunk), record)
    return record


def build_sample(it: dict, params: dict, counts: ChunkCounts) -> tuple[bytes, dict] | None:
    """The stored JPEG and the json of one item; None when the item is dropped (counted).
    What it notes (``info``: how the file was found, re-encoded, boxes clipped...) is counted
    only when the sample is written."""
    stored = _stored_image(it, params, counts)
    if stored is None:
        return None
    img, notes = stored
    to_file = _metadata_scale(it.get("meta_size"), img, notes)
    regions = _clean_regions(it.get("regions") or (), img, to_file, counts.tally, notes)
    sentences = _clean_sentences(it.get("sentences") or (), counts.tally)
    if it["source"] == "vg" and not regions:
        counts.drop_image(it, "no_valid_regions")
        return None
    if it["source"] == "karpathy" and not sentences:
        counts.drop_image(it, "no_valid_captions")
        return None
    meta = {"image_id": it["image_id"], "source": it["source"], "split": it["split"],
            "width": img.width, "height": img.height, "coco_id": it.get("coco_id"),
            **{k: it[k] for k in ("file_name", "flickr_id") if k in it},
            "regions": regions, "groups": region_groups(regions, params["iou_threshold"]), "sentences": sentences}
    if it.get("proposals") is not None:
        meta["proposals"] = _clean_proposals(it["proposals"], img, notes)
    counts.info.update(notes)
    return img.data, meta


def _stored_image(it: dict, params: dict, counts: ChunkCounts) -> tuple[StoredImage, Counter] | None:
    """The item's image as it will be stored and what to note about it; None when it is
    missing, refused (not a regular file, too large), unreadable or corrupt (counted)."""
    paths = it.get("paths") or ()
    try:
        index, raw = read_image(paths, params.get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES))
    except FileNotFoundError:
        counts.drop_item(it, "missing_file", paths[0] if paths else None)
        return None
    except Refused as e:
        counts.drop_item(it, e.reason, e.path)
        return None
    except OSError as e:
        counts.drop_item(it, "unreadable_file", e.filename if isinstance(e.filename, str) else None)
        return None
    counts.bytes_in += len(raw)
    try:
        img = prepare_image(raw, params.get("max_side"), params.get("verify", "decode"))
    except BadImage:
        counts.drop_item(it, "corrupt_image", paths[index])
        return None
    notes: Counter = Counter()
    kinds = it.get("path_kinds")
    if kinds:
        notes[f"found_by_{kinds[index]}"] += 1
    if img.action != "copied":
        notes[f"images_{img.action}"] += 1
    return img, notes


def _metadata_scale(meta_size, img: StoredImage, notes: Counter) -> tuple[float, float]:
    """What maps box coordinates given in image_data.json's size onto the file's pixels.
    (1, 1) when the sizes agree, or when they differ in aspect ratio too (the boxes are then
    clipped to the file); the file / metadata ratio when the file is a resized copy (a
    pre-resized VG mirror), noted as ``boxes_rescaled_to_file``."""
    if not meta_size:
        return 1.0, 1.0
    mw, mh = meta_size
    W, H = img.orig_width, img.orig_height
    if (mw, mh) == (W, H):
        return 1.0, 1.0
    notes["size_differs_from_metadata"] += 1
    sx, sy = W / mw, H / mh
    if abs(sx - sy) > ASPECT_TOLERANCE * max(sx, sy):
        return 1.0, 1.0
    notes["boxes_rescaled_to_file"] += 1
    return sx, sy


def _region_fields(r) -> tuple | None:
    """``(id, phrase, x, y, width, height)`` of a VG region dict (v1.2 or v1.0 spelling), or
    None when it is malformed."""
    if not isinstance(r, dict):
        return None
    rid, phrase = region_id_of(r), r.get("phrase")
    x, y, bw, bh = r.get("x"), r.get("y"), r.get("width"), r.get("height")
    if type(phrase) is not str or type(rid) is not int or not (
            _number(x) and _number(y) and _number(bw) and _number(bh)):
        return None
    return rid, phrase, x, y, bw, bh


def _clean_regions(raw_regions: Sequence, img: StoredImage, to_file: tuple[float, float], tally: Tally,
                   notes: Counter) -> list[dict]:
    """VG region dicts -> ``{id, box, raw, tokens}``: the box mapped onto the file
    (``to_file``: :func:`_metadata_scale`), clipped to it and scaled to the stored JPEG;
    malformed, empty-caption and degenerate regions dropped (counted in ``tally``)."""
    W, H = img.orig_width, img.orig_height
    mx, my = to_file
    sx, sy = img.scale
    rescaled = (mx, my) != (1.0, 1.0) or (sx, sy) != (1.0, 1.0)
    regions = []
    for r in raw_regions:
        fields = _region_fields(r)
        if fields is None:
            tally.drop("bad_region", regions=1)
            continue
        rid, phrase, x, y, bw, bh = fields
        toks = clean_caption(phrase)
        if not toks:
            tally.drop("empty_caption", regions=1)
            continue
        if (mx, my) != (1.0, 1.0):
            x, y, bw, bh = x * mx, y * my, bw * mx, bh * my
        x2, y2 = x + bw, y + bh
        cx1, cy1 = (0 if x < 0 else W if x > W else x), (0 if y < 0 else H if y > H else y)
        cx2, cy2 = (0 if x2 < 0 else W if x2 > W else x2), (0 if y2 < 0 else H if y2 > H else y2)
        if not (cx2 > cx1 and cy2 > cy1):
            tally.drop("degenerate_box", regions=1)
            continue
        box = [cx1, cy1, cx2, cy2]
        if cx1 != x or cy1 != y or cx2 != x2 or cy2 != y2:
            notes["boxes_clipped"] += 1
        if rescaled:
            box = [round(box[0] * sx, 2), round(box[1] * sy, 2), round(box[2] * sx, 2), round(box[3] * sy, 2)]
        regions.append({"id": rid, "box": box, "raw": phrase, "tokens": toks})
    return regions


def _clean_sentences(raw_sentences: Sequence, tally: Tally) -> list[dict]:
    """Raw sentences -> ``{raw, tokens}``; non-strings and empty captions dropped."""
    sentences = []
    for s in raw_sentences:
        if not isinstance(s, str):
            tally.drop("bad_sentence", sentences=1)
            continue
        toks = clean_caption(s)
        if not toks:
            tally.drop("empty_caption", sentences=1)
            continue
        sentences.append({"raw": s, "tokens": toks})
    return sentences


def _clean_proposals(proposals: Sequence, img: StoredImage, notes: Counter) -> list[list[float]]:
    """Detection boxes clipped to the image and scaled to the stored JPEG; malformed and
    degenerate ones dropped (noted as ``proposals_dropped``)."""
    sx, sy = img.scale
    kept = []
    for p in proposals:
        if not (isinstance(p, list) and len(p) == 4 and all(_number(v) for v in p)):
            notes["proposals_dropped"] += 1
            continue
        c = clip_box(p, img.orig_width, img.orig_height)
        if is_degenerate(c):
            notes["proposals_dropped"] += 1
            continue
        kept.append([round(c[0] * sx, 2), round(c[1] * sy, 2), round(c[2] * sx, 2), round(c[3] * sy, 2)])
    return kept
