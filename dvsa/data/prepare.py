"""``dvsa prepare``: raw VG / Karpathy-split data -> WebDataset shards + manifest + vocab.

The driver streams the metadata (ijson), assigns splits, drops and counts what it can judge
without pixels (unknown image, not in the split, duplicate region id...), and hands chunks of
images to :func:`dvsa.data.chunks.process_chunk` as Ray tasks (a bounded number in flight).
Finished chunks are skipped on a re-run. At the end it merges the chunk records into
``manifest.json`` and builds ``vocab.json`` from the train split's tokens, then checks that
inputs = written + dropped for images, regions and sentences.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import fsspec

from dvsa.data import karpathy as kp
from dvsa.data import vg
from dvsa.data.chunks import RECORDS, fingerprint, process_chunk, read_record
from dvsa.data.shards import MANIFEST, SHARD_RE, SPLITS, VOCAB, write_json_atomic
from dvsa.data.splits import default_split_sizes, deterministic_split, load_split_file
from dvsa.errors import DataError
from dvsa.text import Vocab

log = logging.getLogger(__name__)

FORMAT = "dvsa-shards/1"
DEFAULT_SHARD_BYTES = 128 * 2**20
DEFAULT_CHUNK_IMAGES = 1000


# --------------------------------------------------------------------------- ray


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Reuse an initialised Ray; else join ``address`` / RAY_ADDRESS; else start a local Ray
    with its own short temp dir, shut down (and removed) on exit."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    tmp = None
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        tmp = tempfile.mkdtemp(prefix="dvsa-ray-", dir="/tmp")
        ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
                 configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


class _Runner:
    """Runs chunks in Ray tasks (``use_ray``) or in this process, at most ``max_in_flight``."""

    def __init__(self, out: str, params: dict, use_ray: bool, ray_mod=None, on_done: Callable | None = None):
        self.out, self.params, self.use_ray = out, params, use_ray
        self.records: dict[int, dict] = {}
        self.skipped = 0
        self.on_done = on_done or (lambda rec, n: None)
        if use_ray:
            self.ray = ray_mod
            self.remote = ray_mod.remote(num_cpus=1, max_retries=2)(process_chunk)
            cpus = int(ray_mod.available_resources().get("CPU", 1)) or 1
            self.max_in_flight = max(2, 2 * cpus)
            self.pending: dict = {}

    def submit(self, chunk: int, items: list[dict]) -> None:
        fp = fingerprint(self.params, items)
        rec = read_record(self.out, chunk)
        if rec is not None and rec.get("fingerprint") == fp:
            self.records[chunk] = rec
            self.skipped += 1
            self.on_done(rec, len(items))
            return
        if not self.use_ray:
            rec = process_chunk(chunk, items, self.out, self.params, fp)
            self.records[chunk] = rec
            self.on_done(rec, len(items))
            return
        while len(self.pending) >= self.max_in_flight:
            self._wait_one()
        ref = self.remote.remote(chunk, items, self.out, self.params, fp)
        self.pending[ref] = (chunk, len(items))

    def _wait_one(self) -> None:
        done, _ = self.ray.wait(list(self.pending), num_returns=1)
        for ref in done:
            chunk, n = self.pending.pop(ref)
            rec = self.ray.get(ref)
            self.records[chunk] = rec
            self.on_done(rec, n)

    def finish(self) -> dict[int, dict]:
        if self.use_ray:
            while self.pending:
                self._wait_one()
        return self.records


def _chunked(items: Iterable[dict], size: int) -> Iterator[tuple[int, list[dict]]]:
    """Numbered chunks of ``size`` items, each of one split: a chunk writes one run of shards,
    so the 5,000 val and test images fill whole shards instead of a small one per mixed chunk."""
    bufs: dict[str, list[dict]] = {}
    k = 0
    for it in items:
        buf = bufs.setdefault(it["split"], [])
        buf.append(it)
        if len(buf) >= size:
            yield k, buf
            bufs[it["split"]], k = [], k + 1
    for split in sorted(bufs):
        if bufs[split]:
            yield k, bufs[split]
            k += 1


class _RegionIds:
    """Seen region ids: a growable bitmap for ids < 2**31 (4.1M ids -> < 1 MB), a set beyond."""

    def __init__(self):
        self.bits = bytearray()
        self.other: set = set()

    def add(self, rid) -> bool:
        """False if ``rid`` was seen before."""
        if isinstance(rid, int) and 0 <= rid < 2**31:
            byte, bit = divmod(rid, 8)
            if byte >= len(self.bits):
                self.bits.extend(bytes(max(byte + 1 - len(self.bits), len(self.bits))))
            if self.bits[byte] >> bit & 1:
                return False
            self.bits[byte] |= 1 << bit
            return True
        key = repr(rid)
        if key in self.other:
            return False
        self.other.add(key)
        return True


# --------------------------------------------------------------------------- common


def _input_files(paths: Iterable[str]) -> dict:
    out = {}
    for p in paths:
        if p is None:
            continue
        fs, path = fsspec.core.url_to_fs(str(p))
        try:
            out[str(p)] = {"bytes": fs.size(path)}
        except FileNotFoundError:
            raise DataError(f"{p}: no such file") from None
    return out


def _run(source: str, out: str, params: dict, items: Iterable[dict], driver_dropped: dict,
         driver_inputs: Counter, input_files: dict, address, num_cpus, use_ray: bool, progress: bool,
         total_images: int | None, extra: Callable[[dict], None] | None = None) -> dict:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    fs, base = fsspec.core.url_to_fs(str(out))
    fs.makedirs(posixpath.join(base, RECORDS), exist_ok=True)
    bar = tqdm(total=total_images, unit="img", desc=f"prepare {source}", disable=not progress or None)
    # the big parts of chunk records are folded in as they arrive (not kept per chunk)
    totals = {"tokens": Counter(), "coco_ids": {}}
    done = {"chunks": 0, "images": 0, "logged": time.monotonic()}

    def on_done(rec, n):
        totals["tokens"].update(rec.pop("tokens", {}))
        for s, ids in rec.pop("coco_ids", {}).items():
            totals["coco_ids"].setdefault(s, []).extend(ids)
        bar.update(n)
        done["chunks"] += 1
        done["images"] += n
        if progress and bar.disable and time.monotonic() - done["logged"] >= 30:
            # no terminal (ray job submit's log, CI): a line every 30 s instead of a bar
            done["logged"] = time.monotonic()
            of = f" of {total_images:,}" if total_images else ""
            log.info("prepare %s: %d chunks, %s images%s (%.0f s)", source, done["chunks"],
                     f"{done['images']:,}", of, time.perf_counter() - t0)

    def go(ray_mod):
        runner = _Runner(str(out), params, use_ray, ray_mod, on_done)
        for chunk, batch in _chunked(items, params["chunk_images"]):
            runner.submit(chunk, batch)
        return runner.finish(), runner.skipped

    if use_ray:
        with ray_session(address, num_cpus) as ray_mod:
            records, skipped = go(ray_mod)
    else:
        records, skipped = go(None)
    bar.close()
    manifest = _finalize(source, out, fs, base, params, records, totals, driver_dropped, driver_inputs,
                         input_files)
    manifest["run"] = {"seconds": round(time.perf_counter() - t0, 3), "chunks": len(records),
                       "chunks_skipped": skipped, "ray": use_ray}
    if extra:
        extra(manifest)
    write_json_atomic(fs, posixpath.join(base, MANIFEST), manifest)
    return manifest


def _finalize(source, out, fs, base, params, records, totals, driver_dropped, driver_inputs, input_files) -> dict:
    chunks = sorted(records)
    # drop leftovers of a previous run with other inputs: shards and records of unknown chunks
    listed = {s["name"] for c in chunks for s in records[c]["shards"]}
    for p in fs.ls(base, detail=False):
        name = posixpath.basename(p)
        if (SHARD_RE.match(name) and name not in listed) or (name.startswith(".") and ".tmp-" in name):
            fs.rm(p)
    for p in fs.ls(posixpath.join(base, RECORDS), detail=False):
        name = posixpath.basename(p)
        if ".tmp-" in name or (name.startswith("chunk-") and int(name[6:12]) not in records):
            fs.rm(p)

    splits = {s: Counter() for s in SPLITS}
    dropped = {k: Counter(v) for k, v in driver_dropped.items()}
    inputs = Counter(driver_inputs)
    info = Counter()
    tokens, coco_ids = totals["tokens"], totals["coco_ids"]
    train_captions, bytes_in, max_rss = 0, 0, 0.0
    shards = []
    for c in chunks:
        rec = records[c]
        for s, cnt in rec["counts"].items():
            splits.setdefault(s, Counter()).update(cnt)
        for k, v in rec["dropped"].items():
            dropped.setdefault(k, Counter()).update(v)
        inputs.update(rec["inputs"])
        info.update(rec["info"])
        train_captions += rec["train_captions"]
        bytes_in += rec["bytes_in"]
        max_rss = max(max_rss, rec.get("worker_max_rss_mb", 0.0))
        shards += rec["shards"]
    for s, cnt in splits.items():
        cnt["shards"] = sum(1 for sh in shards if sh["split"] == s)
        for k in ("images", "regions", "groups", "sentences"):
            cnt.setdefault(k, 0)

    vocab = Vocab.build(tokens, params["min_count"], train_captions)
    vocab.save(fs.unstrip_protocol(posixpath.join(base, VOCAB)) if "file" not in _protocols(fs)
               else posixpath.join(base, VOCAB))

    written = {k: sum(splits[s][k] for s in splits) for k in ("images", "regions", "sentences")}
    manifest = {
        "format": FORMAT,
        "source": source,
        "params": params,
        "inputs": {"files": input_files, "images": inputs["images"], "regions": inputs["regions"],
                   "sentences": inputs["sentences"], "image_bytes_read": bytes_in},
        "written": written,
        "splits": {s: dict(c) for s, c in splits.items()},
        "shards": sorted(shards, key=lambda s: s["name"]),
        "dropped": {k: {r: n for r, n in sorted(v.items()) if n} for k, v in dropped.items()},
        "info": dict(sorted(info.items())),
        "vocab": {"size": len(vocab), "min_count": params["min_count"], "train_captions": train_captions},
        "coco_ids": {s: sorted(v) for s, v in coco_ids.items()},
        "worker_max_rss_mb": round(max_rss, 1),
    }
    check_balance(manifest)
    return manifest


def _protocols(fs) -> tuple:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def check_balance(manifest: dict) -> None:
    """Raise DataError unless inputs = written + dropped for images, regions and sentences,
    and the shards' sample counts add up to the images written."""
    for kind in ("images", "regions", "sentences"):
        n_in = manifest["inputs"][kind]
        n_out = manifest["written"][kind] + sum(manifest["dropped"].get(kind, {}).values())
        if n_in != n_out:
            raise DataError(f"manifest does not balance for {kind}: {n_in} in, "
                            f"{manifest['written'][kind]} written + {n_out - manifest['written'][kind]} dropped")
    in_shards = sum(s["samples"] for s in manifest["shards"])
    if in_shards != manifest["written"]["images"]:
        raise DataError(f"manifest: shards hold {in_shards} samples but {manifest['written']['images']} images were written")


def _params(source: str, **kw) -> dict:
    p = {"source": source, "iou_threshold": 0.7, **kw}
    if p["shard_bytes"] <= 0:
        raise DataError(f"--shard-bytes must be > 0, got {p['shard_bytes']}")
    if p["chunk_images"] <= 0:
        raise DataError(f"--chunk-images must be > 0, got {p['chunk_images']}")
    if p.get("max_side") is not None and p["max_side"] < 8:
        raise DataError(f"--max-side must be >= 8 pixels, got {p['max_side']}")
    if p["verify"] not in ("decode", "markers"):
        raise DataError(f"--verify: {p['verify']!r} is not one of 'decode', 'markers'")
    if p["min_count"] < 1:
        raise DataError(f"--min-count must be >= 1, got {p['min_count']}")
    return p


def _other_coco_ids(shards: str, source: str, splits: tuple[str, ...]) -> set:
    """coco ids of ``splits`` in the manifest of prepared ``source`` shards (the leakage guard)."""
    from dvsa.data.shards import load_manifest

    m = load_manifest(shards)
    if m.get("source") != source:
        raise DataError(f"{shards}: holds {m.get('source')!r} shards, not {source!r} (the leakage guard "
                        f"compares against prepared {source} shards)")
    return {i for s in splits for i in m.get("coco_ids", {}).get(s, [])}


# --------------------------------------------------------------------------- VG


def prepare_vg(root: str, out: str, split_file: str | None = None, val_images: int | None = None,
               test_images: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
               max_side: int | None = None, min_count: int = 15,
               chunk_images: int = DEFAULT_CHUNK_IMAGES, address: str | None = None,
               num_cpus: int | None = None, use_ray: bool = True, progress: bool = True,
               verify: str = "decode", karpathy_shards: str | None = None) -> dict:
    """Visual Genome v1.2 under ``root`` -> shards under ``out`` (a path or fsspec URL).
    Returns the manifest (also written to ``out/manifest.json``).

    ``karpathy_shards``: prepared Karpathy-split shards; VG val/test images whose ``coco_id``
    is among their train images are reported (manifest ``leakage``): a full-frame model
    trained there would be evaluated on images it trained on.
    """
    root = str(root).rstrip("/")
    kp_train = _other_coco_ids(karpathy_shards, "karpathy", ("train",)) if karpathy_shards else None
    params = _params("vg", shard_bytes=int(shard_bytes), max_side=max_side, min_count=int(min_count), verify=verify,
                     chunk_images=int(chunk_images), split_file=str(split_file) if split_file else None)
    image_data = vg.read_image_data(root)
    info_extra = {}
    if split_file:
        split_of = load_split_file(split_file)
        unknown = [i for i in split_of if i not in image_data]
        info_extra["split_file_unknown_ids"] = len(unknown)
        if unknown:
            log.warning("%s names %d image ids not in image_data.json (e.g. %s): ignored",
                        split_file, len(unknown), unknown[:5])
    else:
        n_val, n_test = default_split_sizes(len(image_data), val_images, test_images)
        params["val_images"], params["test_images"] = n_val, n_test
        split_of = deterministic_split(image_data, n_val, n_test)

    dropped = {"images": Counter(), "regions": Counter(), "sentences": Counter()}
    inputs = Counter()
    seen_images: set[int] = set()
    region_ids = _RegionIds()

    def items() -> Iterator[dict]:
        for iid, regions, k in vg.iter_region_entries(root):
            if iid is None:
                inputs["images"] += 1
                inputs["regions"] += len(regions)
                dropped["images"]["bad_element"] += 1
                dropped["regions"]["bad_element"] += len(regions)
                continue
            reason = None
            if iid in seen_images:
                reason = "duplicate_image"
            elif iid not in image_data:
                reason = "not_in_image_data"
            elif iid not in split_of:
                reason = "not_in_split"
            if reason:
                inputs["images"] += 1
                inputs["regions"] += len(regions)
                dropped["images"][reason] += 1
                dropped["regions"][reason] += len(regions)
                seen_images.add(iid)
                continue
            seen_images.add(iid)
            kept = []
            for r in regions:
                rid = r.get("region_id") if isinstance(r, dict) else None
                if rid is not None and not region_ids.add(rid):
                    inputs["regions"] += 1
                    dropped["regions"]["duplicate_region_id"] += 1
                else:
                    kept.append(r)
            meta = image_data[iid]
            size = [meta["width"], meta["height"]] if _is_size(meta["width"], meta["height"]) else None
            yield {"image_id": iid, "split": split_of[iid], "source": "vg",
                   "paths": vg.image_candidates(root, iid, meta["relpath"]),
                   "coco_id": meta["coco_id"], "meta_size": size, "regions": kept}

    files = _input_files([posixpath.join(root, "image_data.json"), posixpath.join(root, "region_descriptions.json"),
                          split_file])

    def extra(manifest: dict) -> None:
        # images of image_data.json that region_descriptions.json never mentions
        missing = [i for i in image_data if i not in seen_images]
        manifest["inputs"]["images"] += len(missing)
        if missing:
            d = manifest["dropped"].setdefault("images", {})
            d["no_region_entry"] = d.get("no_region_entry", 0) + len(missing)
        manifest["info"].update(info_extra)
        if kp_train is not None:
            leaked = sorted({i for s in ("val", "test") for i in manifest["coco_ids"].get(s, []) if i in kp_train})
            manifest["leakage"] = {"karpathy_shards": str(karpathy_shards), "images": len(leaked),
                                   "what": "VG val/test images in the Karpathy train split", "examples": leaked[:20]}
            if leaked:
                log.warning("leakage: %d VG val/test images are Karpathy train images (coco ids e.g. %s)",
                            len(leaked), leaked[:5])
        check_balance(manifest)

    manifest = _run("vg", out, params, items(), dropped, inputs, files, address, num_cpus, use_ray, progress,
                    total_images=len(image_data), extra=extra)
    return manifest


def _is_size(w, h) -> bool:
    return isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0


# --------------------------------------------------------------------------- Karpathy


def prepare_karpathy(json_path: str, images_root: str, out: str, proposals: str | None = None,
                     min_count: int = 5, vg_shards: str | None = None,
                     shard_bytes: int = DEFAULT_SHARD_BYTES, max_side: int | None = None,
                     chunk_images: int = DEFAULT_CHUNK_IMAGES, address: str | None = None,
                     num_cpus: int | None = None, use_ray: bool = True, progress: bool = True,
                     verify: str = "decode") -> dict:
    """A Karpathy split file + its images -> shards under ``out``; returns the manifest.

    ``vg_shards``: a prepared VG directory; Karpathy train images whose ``cocoid`` is among
    that manifest's val/test ``coco_ids`` are reported (manifest ``leakage``), so a full-frame
    model is never evaluated on VG images it trained on.
    """
    images_root = str(images_root).rstrip("/")
    params = _params("karpathy", shard_bytes=int(shard_bytes), max_side=max_side, min_count=int(min_count), verify=verify,
                     chunk_images=int(chunk_images), proposals=str(proposals) if proposals else None)
    props = kp.load_proposals(proposals) if proposals else None
    vg_eval = _other_coco_ids(vg_shards, "vg", ("val", "test")) if vg_shards else set()
    dropped = {"images": Counter(), "regions": Counter(), "sentences": Counter()}
    inputs = Counter()
    seen: set[int] = set()
    leaked: list[int] = []
    def items() -> Iterator[dict]:
        for k, e in kp.iter_karpathy(json_path):
            sents = e.get("sentences") if isinstance(e, dict) else None
            raw = [_sentence_raw(s) for s in sents] if isinstance(sents, list) else []
            iid = kp.image_id_of(e) if isinstance(e, dict) else None
            split = kp.SPLIT_MAP.get(e.get("split")) if isinstance(e, dict) else None
            rel = kp.image_relpath(e) if isinstance(e, dict) else None
            reason = None
            if iid is None or rel is None or not isinstance(sents, list):
                reason = "bad_element"
            elif iid in seen:
                reason = "duplicate_image"
            elif split is None:
                reason = "unknown_split"
            if reason:
                inputs["images"] += 1
                inputs["sentences"] += len(raw)
                dropped["images"][reason] += 1
                dropped["sentences"][reason] += len(raw)
                continue
            seen.add(iid)
            cocoid = e.get("cocoid")
            if split == "train" and cocoid is not None and cocoid in vg_eval:
                leaked.append(cocoid)
            item = {"image_id": iid, "split": split, "source": "karpathy",
                    "paths": [posixpath.join(images_root, rel)], "coco_id": cocoid,
                    "meta_size": None, "regions": [], "sentences": raw}
            if props is not None:
                item["proposals"] = props.get(str(iid), [])
            yield item

    files = _input_files([json_path, proposals])

    def extra(manifest: dict) -> None:
        if vg_shards:
            manifest["leakage"] = {"vg_shards": str(vg_shards), "images": len(leaked),
                                   "what": "Karpathy train images in the VG val/test splits",
                                   "examples": sorted(leaked)[:20]}
            if leaked:
                log.warning("leakage: %d Karpathy train images are VG val/test images (coco ids e.g. %s)",
                            len(leaked), sorted(leaked)[:5])
        # only the train coco ids matter downstream (the leakage guard of the other direction)
        manifest["coco_ids"] = {"train": manifest["coco_ids"].get("train", [])}

    return _run("karpathy", out, params, items(), dropped, inputs, files, address, num_cpus, use_ray, progress,
                total_images=None, extra=extra)


def _sentence_raw(s):
    """A sentence's raw text (``raw``, else its ``tokens`` joined); None when it has neither."""
    if isinstance(s, dict):
        if isinstance(s.get("raw"), str):
            return s["raw"]
        if isinstance(s.get("tokens"), list) and all(isinstance(t, str) for t in s["tokens"]):
            return " ".join(s["tokens"])
    return None


# --------------------------------------------------------------------------- summary


def summary(manifest: dict) -> str:
    """A few lines: per-split counts, drops by reason, vocab, time."""
    lines = [f"{'split':<6} {'images':>9} {'regions':>10} {'groups':>9} {'sentences':>10} {'shards':>7}"]
    for s, c in manifest["splits"].items():
        lines.append(f"{s:<6} {c['images']:>9} {c['regions']:>10} {c['groups']:>9} {c['sentences']:>10} {c['shards']:>7}")
    for kind, reasons in manifest["dropped"].items():
        if reasons:
            lines.append(f"dropped {kind}: " + ", ".join(f"{r}={n}" for r, n in reasons.items()))
    if manifest.get("info"):
        lines.append("notes: " + ", ".join(f"{k}={v}" for k, v in manifest["info"].items()))
    lines.append(f"vocab: {manifest['vocab']['size']} words (min count {manifest['vocab']['min_count']})")
    if "leakage" in manifest:
        lines.append(f"leakage guard: {manifest['leakage']['images']} {manifest['leakage']['what']}")
    run = manifest.get("run", {})
    lines.append(f"inputs balance: images {manifest['inputs']['images']}, regions {manifest['inputs']['regions']}, "
                 f"sentences {manifest['inputs']['sentences']} = written + dropped; "
                 f"{run.get('chunks', 0)} chunks ({run.get('chunks_skipped', 0)} already done) in {run.get('seconds', 0):.1f}s")
    return "\n".join(lines)
