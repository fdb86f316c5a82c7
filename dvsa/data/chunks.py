"""One chunk of images -> shards: the unit of work ``dvsa prepare`` fans out as a Ray task.

A chunk writes its own shards, numbered ``chunk * STRIDE + k`` (``train-004002.tar`` is the
third train shard of chunk 4), each atomically, and last a completion record
``_chunks/chunk-NNNNNN.json`` holding what it wrote, counted and dropped. A re-run skips
chunks whose record matches (same parameters, same images); an unfinished chunk first removes
whatever a killed run left of it, then redoes it, so no sample is lost or duplicated.
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
from dvsa.data.images import BadImage, StoredImage, prepare_image
from dvsa.data.manifest import ShardRecord, SplitCounts, Tally, split_counts_from_dicts
from dvsa.data.shards import SHARD_RE, ShardWriter
from dvsa.files import write_json_atomic
from dvsa.text import clean_caption

STRIDE = 1000          # shard numbers reserved per chunk (and split)
RECORDS = "_chunks"


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


def _read_first(paths) -> bytes:
    """Bytes of the first of ``paths`` that exists; FileNotFoundError if none does."""
    for p in paths:
        try:
            if "://" not in p:
                with open(p, "rb") as f:
                    return f.read()
            with fsspec.open(p, "rb") as f:
                return f.read()
        except FileNotFoundError:
            continue
    raise FileNotFoundError(paths[0] if paths else "no path")


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

    def drop_item(self, it: dict, reason: str) -> None:
        """The whole image goes, with its regions and sentences."""
        self.tally.drop(reason, images=1, regions=len(it.get("regions") or ()),
                        sentences=len(it.get("sentences") or ()))

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

    def record(self, chunk: int, fp: str, shards: list[ShardRecord]) -> dict:
        """The completion record (JSON): what the chunk wrote, counted and dropped."""
        return {"chunk": chunk, "fingerprint": fp, "shards": [s.to_dict() for s in shards],
                "counts": {s: c.to_dict() for s, c in self.splits.items()}, **self.tally.to_dict(),
                "info": dict(self.info), "tokens": dict(self.tokens), "train_captions": self.train_captions,
                "coco_ids": self.coco_ids, "bytes_in": self.bytes_in,
                "worker_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def process_chunk(chunk: int, items: list[dict], out: str, params: dict, fp: str) -> dict:
    """Write the shards of one chunk and its completion record; return the record.

    ``items``: one dict per image: ``image_id, split, source, paths (candidate files, first found wins),
    coco_id, meta_size ([w, h] or None), regions (raw VG dicts), sentences (raw str or None),
    proposals (list or None)``.
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
    """The stored JPEG and the json of one item; None when the item is dropped (counted)."""
    img = _stored_image(it, params, counts)
    if img is None:
        return None
    regions = _clean_regions(it.get("regions") or (), img, counts)
    sentences = _clean_sentences(it.get("sentences") or (), counts.tally)
    if it["source"] == "vg" and not regions:
        counts.tally.drop("no_valid_regions", images=1)
        return None
    if it["source"] == "karpathy" and not sentences:
        counts.tally.drop("no_valid_captions", images=1)
        return None
    meta = {"image_id": it["image_id"], "source": it["source"], "split": it["split"],
            "width": img.width, "height": img.height, "coco_id": it.get("coco_id"),
            "regions": regions, "groups": region_groups(regions, params["iou_threshold"]), "sentences": sentences}
    if it.get("proposals") is not None:
        meta["proposals"] = _clean_proposals(it["proposals"], img, counts.info)
    return img.data, meta


def _stored_image(it: dict, params: dict, counts: ChunkCounts) -> StoredImage | None:
    """The item's image as it will be stored; None when it is missing, unreadable or corrupt."""
    try:
        raw = _read_first(it.get("paths") or ())
    except FileNotFoundError:
        counts.drop_item(it, "missing_file")
        return None
    except OSError:
        counts.drop_item(it, "unreadable_file")
        return None
    counts.bytes_in += len(raw)
    try:
        img = prepare_image(raw, params.get("max_side"), params.get("verify", "decode"))
    except BadImage:
        counts.drop_item(it, "corrupt_image")
        return None
    if img.action != "copied":
        counts.info[f"images_{img.action}"] += 1
    ms = it.get("meta_size")
    if ms and (ms[0], ms[1]) != (img.orig_width, img.orig_height):
        counts.info["size_differs_from_metadata"] += 1
    return img


def _clean_regions(raw_regions: Sequence, img: StoredImage, counts: ChunkCounts) -> list[dict]:
    """VG region dicts -> ``{id, box, raw, tokens}`` with the box clipped to the image and
    scaled to the stored JPEG; malformed, empty-caption and degenerate regions dropped."""
    W, H = img.orig_width, img.orig_height
    sx, sy = img.scale
    regions = []
    for r in raw_regions:
        try:
            phrase, rid = r["phrase"], r["region_id"]
            x, y, bw, bh = r["x"], r["y"], r["width"], r["height"]
        except (TypeError, KeyError):
            counts.tally.drop("bad_region", regions=1)
            continue
        if type(phrase) is not str or type(rid) is not int or not (
                _number(x) and _number(y) and _number(bw) and _number(bh)):
            counts.tally.drop("bad_region", regions=1)
            continue
        toks = clean_caption(phrase)
        if not toks:
            counts.tally.drop("empty_caption", regions=1)
            continue
        x2, y2 = x + bw, y + bh
        cx1, cy1 = (0 if x < 0 else W if x > W else x), (0 if y < 0 else H if y > H else y)
        cx2, cy2 = (0 if x2 < 0 else W if x2 > W else x2), (0 if y2 < 0 else H if y2 > H else y2)
        if not (cx2 > cx1 and cy2 > cy1):
            counts.tally.drop("degenerate_box", regions=1)
            continue
        clipped = [cx1, cy1, cx2, cy2]
        if cx1 != x or cy1 != y or cx2 != x2 or cy2 != y2:
            counts.info["boxes_clipped"] += 1
        if (sx, sy) != (1.0, 1.0):
            clipped = [round(clipped[0] * sx, 2), round(clipped[1] * sy, 2),
                       round(clipped[2] * sx, 2), round(clipped[3] * sy, 2)]
        regions.append({"id": rid, "box": clipped, "raw": phrase, "tokens": toks})
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


def _clean_proposals(proposals: Sequence, img: StoredImage, info: Counter) -> list[list[float]]:
    """Detection boxes clipped to the image and scaled to the stored JPEG; malformed and
    degenerate ones dropped (counted in ``info``)."""
    sx, sy = img.scale
    kept = []
    for p in proposals:
        if not (isinstance(p, list) and len(p) == 4 and all(_number(v) for v in p)):
            info["proposals_dropped"] += 1
            continue
        c = clip_box(p, img.orig_width, img.orig_height)
        if is_degenerate(c):
            info["proposals_dropped"] += 1
            continue
        kept.append([round(c[0] * sx, 2), round(c[1] * sy, 2), round(c[2] * sx, 2), round(c[3] * sy, 2)])
    return kept
