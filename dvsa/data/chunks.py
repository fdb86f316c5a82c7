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
from collections import Counter, defaultdict
from itertools import chain

import fsspec

from dvsa.boxes import clip_box, group_boxes, is_degenerate
from dvsa.data.images import BadImage, prepare_image
from dvsa.data.shards import SHARD_RE, ShardWriter, write_json_atomic
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


def process_chunk(chunk: int, items: list[dict], out: str, params: dict, fp: str) -> dict:
    """Write the shards of one chunk and its completion record; return the record.

    ``items``: one dict per image: ``image_id, split, source, paths (candidate files, first found wins),
    coco_id, meta_size ([w, h] or None), regions (raw VG dicts), sentences (raw str or None),
    proposals (list or None)``.
    """
    fs, base = fsspec.core.url_to_fs(out)
    fs.makedirs(posixpath.join(base, RECORDS), exist_ok=True)
    _clean_stale(fs, base, chunk)

    max_side = params.get("max_side")
    thr = params["iou_threshold"]
    writers: dict[str, ShardWriter] = {}
    counts = defaultdict(lambda: Counter())          # split -> images/regions/groups/sentences
    dropped = {"images": Counter(), "regions": Counter(), "sentences": Counter()}
    info = Counter()
    tokens = Counter()
    train_captions = 0
    coco_ids = defaultdict(list)
    inputs = Counter()
    bytes_in = 0

    def drop_image(it, reason):
        dropped["images"][reason] += 1
        dropped["regions"][reason] += len(it.get("regions") or ())
        dropped["sentences"][reason] += len(it.get("sentences") or ())

    try:
        for it in items:
            inputs["images"] += 1
            inputs["regions"] += len(it.get("regions") or ())
            inputs["sentences"] += len(it.get("sentences") or ())
            split = it["split"]
            try:
                raw = _read_first(it.get("paths") or ())
            except FileNotFoundError:
                drop_image(it, "missing_file")
                continue
            except OSError:
                drop_image(it, "unreadable_file")
                continue
            bytes_in += len(raw)
            try:
                img = prepare_image(raw, max_side, params.get("verify", "decode"))
            except BadImage:
                drop_image(it, "corrupt_image")
                continue
            if img.action != "copied":
                info[f"images_{img.action}"] += 1
            ms = it.get("meta_size")
            if ms and (ms[0], ms[1]) != (img.orig_width, img.orig_height):
                info["size_differs_from_metadata"] += 1
            sx, sy = img.scale
            W, H = img.orig_width, img.orig_height

            # ---- regions: clean, clip, drop degenerate / empty
            regions = []
            for r in it.get("regions") or ():
                try:
                    phrase, rid = r["phrase"], r["region_id"]
                    x, y, bw, bh = r["x"], r["y"], r["width"], r["height"]
                except (TypeError, KeyError):
                    dropped["regions"]["bad_region"] += 1
                    continue
                if type(phrase) is not str or type(rid) is not int or not (
                        _number(x) and _number(y) and _number(bw) and _number(bh)):
                    dropped["regions"]["bad_region"] += 1
                    continue
                toks = clean_caption(phrase)
                if not toks:
                    dropped["regions"]["empty_caption"] += 1
                    continue
                x2, y2 = x + bw, y + bh
                cx1, cy1 = (0 if x < 0 else W if x > W else x), (0 if y < 0 else H if y > H else y)
                cx2, cy2 = (0 if x2 < 0 else W if x2 > W else x2), (0 if y2 < 0 else H if y2 > H else y2)
                if not (cx2 > cx1 and cy2 > cy1):
                    dropped["regions"]["degenerate_box"] += 1
                    continue
                clipped = [cx1, cy1, cx2, cy2]
                if cx1 != x or cy1 != y or cx2 != x2 or cy2 != y2:
                    info["boxes_clipped"] += 1
                if (sx, sy) != (1.0, 1.0):
                    clipped = [round(clipped[0] * sx, 2), round(clipped[1] * sy, 2),
                               round(clipped[2] * sx, 2), round(clipped[3] * sy, 2)]
                regions.append({"id": rid, "box": clipped, "raw": phrase, "tokens": toks})

            # ---- sentences
            sentences = []
            for s in it.get("sentences") or ():
                if not isinstance(s, str):
                    dropped["sentences"]["bad_sentence"] += 1
                    continue
                toks = clean_caption(s)
                if not toks:
                    dropped["sentences"]["empty_caption"] += 1
                    continue
                sentences.append({"raw": s, "tokens": toks})

            if it["source"] == "vg" and not regions:
                dropped["images"]["no_valid_regions"] += 1
                continue
            if it["source"] == "karpathy" and not sentences:
                dropped["images"]["no_valid_captions"] += 1
                continue

            groups = []
            for members, box in group_boxes([r["box"] for r in regions], thr):
                groups.append({"box": regions[members[0]]["box"] if len(members) == 1 else [round(v, 2) for v in box],
                               "region_ids": [regions[i]["id"] for i in members],
                               "refs": [regions[i]["raw"] for i in members],
                               "tokens": [regions[i]["tokens"] for i in members]})

            meta = {"image_id": it["image_id"], "source": it["source"], "split": split,
                    "width": img.width, "height": img.height, "coco_id": it.get("coco_id"),
                    "regions": regions, "groups": groups, "sentences": sentences}
            if it.get("proposals") is not None:
                props = []
                for p in it["proposals"]:
                    if not (isinstance(p, list) and len(p) == 4 and all(_number(v) for v in p)):
                        info["proposals_dropped"] += 1
                        continue
                    c = clip_box(p, W, H)
                    if is_degenerate(c):
                        info["proposals_dropped"] += 1
                        continue
                    props.append([round(c[0] * sx, 2), round(c[1] * sy, 2), round(c[2] * sx, 2), round(c[3] * sy, 2)])
                meta["proposals"] = props

            if split not in writers:
                writers[split] = ShardWriter(out, split, params["shard_bytes"], first_number=chunk * STRIDE,
                                             max_shards=STRIDE)
            writers[split].write(str(it["image_id"]), img.data, meta)
            c = counts[split]
            c["images"] += 1
            c["regions"] += len(regions)
            c["groups"] += len(groups)
            c["sentences"] += len(sentences)
            if it.get("coco_id") is not None:
                coco_ids[split].append(it["coco_id"])
            if split == "train":
                tokens.update(chain.from_iterable(cap["tokens"] for cap in regions))
                tokens.update(chain.from_iterable(cap["tokens"] for cap in sentences))
                train_captions += len(regions) + len(sentences)
        shards = []
        for split in sorted(writers):
            shards += writers[split].close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise

    record = {"chunk": chunk, "fingerprint": fp, "shards": shards,
              "counts": {s: dict(c) for s, c in counts.items()},
              "inputs": dict(inputs), "dropped": {k: dict(v) for k, v in dropped.items()},
              "info": dict(info), "tokens": dict(tokens), "train_captions": train_captions,
              "coco_ids": dict(coco_ids), "bytes_in": bytes_in,
              "worker_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    write_json_atomic(fs, record_path(base, chunk), record)
    return record
