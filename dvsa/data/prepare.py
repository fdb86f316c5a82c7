"""``dvsa prepare``: raw VG / Karpathy-split data -> WebDataset shards + manifest + vocab.

The driver streams the metadata (ijson), assigns splits, drops and counts what it can judge
without pixels (unknown image, not in the split, duplicate region id...), and hands chunks of
images to :func:`dvsa.data.chunks.process_chunk` as Ray tasks (a bounded number in flight).
Finished chunks are skipped on a re-run. At the end it merges the chunk records into
``manifest.json`` and builds ``vocab.json`` from the train split's tokens, then checks that
inputs = written + dropped for images, regions and sentences. No sample written at all is a
DataError naming the main drop reason, the first path tried and the fix; a split that is empty
or lost most of its images is a warning (logged, in the summary and the manifest's ``warnings``).
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

import fsspec

from dvsa import runtime
from dvsa.data import karpathy as kp
from dvsa.data import vg
from dvsa.data.chunks import (
    RECORDS,
    ChunkCounts,
    DropLog,
    fingerprint,
    process_chunk,
    read_record,
    record_path,
    shard_problem,
    shard_sizes,
)
from dvsa.data.groups import IOU_GROUP
from dvsa.data.image_files import DEFAULT_MAX_IMAGE_BYTES, UNSAFE_PATH, safe_join
from dvsa.data.manifest import DEFAULT_SHARD_BYTES, KINDS, Manifest, ShardRecord, SplitCounts, Tally, shards_from_dicts
from dvsa.data.shards import SHARD_RE, SPLITS
from dvsa.data.splits import default_split_sizes, deterministic_split, load_split_file
from dvsa.errors import DataError
from dvsa.text import Vocab

log = logging.getLogger(__name__)

DEFAULT_CHUNK_IMAGES = 1000
LOSS_WARNING = 0.5          # a split that loses more than this share of its images is warned about


@dataclass(frozen=True)
class PrepareOptions:
    """How ``dvsa prepare`` writes the shards and runs (the flags every source shares)."""

    shard_bytes: int = DEFAULT_SHARD_BYTES
    max_side: int | None = None              # downscale once so the longer side is <= max_side
    chunk_images: int = DEFAULT_CHUNK_IMAGES  # images per Ray task
    verify: str = "decode"                   # "decode" each JPEG, or check its "markers" only
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # a larger image file is dropped as too_large, unread
    recheck: str = "sha256"                  # a re-run checks finished chunks' shards: "sha256" (+ size) or "size"
    address: str | None = None               # Ray to join (default RAY_ADDRESS, else a local Ray)
    num_cpus: int | None = None              # CPUs of a local Ray
    use_ray: bool = True                     # False: chunks run in this process
    progress: bool = True

    def __post_init__(self) -> None:
        if self.shard_bytes <= 0:
            raise DataError(f"--shard-bytes must be > 0, got {self.shard_bytes}")
        if self.chunk_images <= 0:
            raise DataError(f"--chunk-images must be > 0, got {self.chunk_images}")
        if self.max_side is not None and self.max_side < 8:
            raise DataError(f"--max-side must be >= 8 pixels, got {self.max_side}")
        if self.verify not in ("decode", "markers"):
            raise DataError(f"--verify: {self.verify!r} is not one of 'decode', 'markers'")
        if self.max_image_bytes <= 0:
            raise DataError(f"--max-image-bytes must be > 0, got {self.max_image_bytes}")
        if self.recheck not in ("sha256", "size"):
            raise DataError(f"--recheck: {self.recheck!r} is not one of 'sha256', 'size'")


@dataclass(frozen=True)
class VGSource:
    """Visual Genome v1.2 under ``root`` (image_data.json, region_descriptions.json, VG_100K*/).

    ``split_file``: densecap-style ``{"train": [ids], ...}``; without one, a deterministic split
    with ``val_images`` / ``test_images`` (default min(5000, N/10) each). ``karpathy_shards``:
    prepared Karpathy-split shards; VG val/test images whose ``coco_id`` is among their train
    images are reported (manifest ``leakage``): a full-frame model trained there would be
    evaluated on images it trained on. ``min_count``: the vocabulary's count threshold.
    """

    root: str
    split_file: str | None = None
    val_images: int | None = None
    test_images: int | None = None
    karpathy_shards: str | None = None
    min_count: int = 15


@dataclass(frozen=True)
class KarpathySource:
    """A Karpathy split file (dataset_coco.json...) and the directory its image paths are
    relative to. ``proposals``: ``{"<image id>": [[x1, y1, x2, y2], ...]}`` detection boxes.
    ``vg_shards``: prepared VG shards; Karpathy train images whose ``cocoid`` is among their
    val/test ``coco_ids`` are reported (manifest ``leakage``), so a full-frame model is never
    evaluated on VG images it trained on. ``min_count``: the vocabulary's count threshold."""

    json_path: str
    images_root: str
    proposals: str | None = None
    vg_shards: str | None = None
    min_count: int = 5


# --------------------------------------------------------------------------- chunks


class _FinishedShards:
    """Whether a finished chunk's shards are still on disk as its record lists them (one
    listing of the output; with ``check_sha256`` each of them is read again)."""

    def __init__(self, out: str, check_sha256: bool):
        self.fs, self.base = fsspec.core.url_to_fs(out)
        self.sizes = shard_sizes(self.fs, self.base)
        self.check_sha256 = check_sha256

    def problem(self, rec: dict) -> str | None:
        shards = rec.get("shards")
        if not isinstance(shards, list):
            return "the record lists no shards"
        return shard_problem(self.fs, self.base, shards, self.sizes, self.check_sha256)


class _Runner:
    """Runs chunks in Ray tasks (when given ``ray``) or in this process, at most
    ``max_in_flight`` at once; ``on_done(chunk, record, images)`` as each finishes. A chunk
    whose record matches is skipped while its shards are intact, else redone (``repaired``)."""

    def __init__(self, out: str, params: dict, ray, on_done: Callable[[int, dict, int], None], check_sha256: bool):
        self.out, self.params, self.ray, self.on_done = out, params, ray, on_done
        self.finished = _FinishedShards(out, check_sha256)
        self.skipped = self.repaired = 0
        if ray is not None:
            self.remote = ray.remote(num_cpus=1, max_retries=2)(process_chunk)
            cpus = int(ray.available_resources().get("CPU", 1)) or 1
            self.max_in_flight = max(2, 2 * cpus)
            self.pending: dict = {}

    def submit(self, chunk: int, items: list[dict]) -> None:
        fp = fingerprint(self.params, items)
        rec = read_record(self.out, chunk)
        if rec is not None and rec.get("fingerprint") == fp:
            problem = self.finished.problem(rec)
            if problem is None:
                self.skipped += 1
                self.on_done(chunk, rec, len(items))
                return
            log.warning("chunk %d was finished but %s: redoing it", chunk, problem)
            self.repaired += 1
        if self.ray is None:
            self.on_done(chunk, process_chunk(chunk, items, self.out, self.params, fp), len(items))
            return
        while len(self.pending) >= self.max_in_flight:
            self._wait_one()
        ref = self.remote.remote(chunk, items, self.out, self.params, fp)
        self.pending[ref] = (chunk, len(items))

    def _wait_one(self) -> None:
        done, _ = self.ray.wait(list(self.pending), num_returns=1)
        for ref in done:
            chunk, n = self.pending.pop(ref)
            self.on_done(chunk, self.ray.get(ref), n)

    def finish(self) -> None:
        while self.ray is not None and self.pending:
            self._wait_one()


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


class _Progress:
    """A progress bar on a terminal; without one (``ray job submit``'s log, CI) a log line
    every 30 s instead."""

    def __init__(self, source: str, total: int | None, enabled: bool):
        from tqdm.auto import tqdm

        self.source, self.total, self.enabled = source, total, enabled
        self.bar = tqdm(total=total, unit="img", desc=f"prepare {source}", disable=not enabled or None)
        self.chunks = self.images = 0
        self.t0 = self.logged = time.monotonic()

    def update(self, images: int) -> None:
        self.bar.update(images)
        self.chunks += 1
        self.images += images
        if self.enabled and self.bar.disable and time.monotonic() - self.logged >= 30:
            self.logged = time.monotonic()
            of = f" of {self.total:,}" if self.total else ""
            log.info("prepare %s: %d chunks, %s images%s (%.0f s)", self.source, self.chunks,
                     f"{self.images:,}", of, self.logged - self.t0)

    def close(self) -> None:
        self.bar.close()


@dataclass
class _Chunks:
    """The finished chunks' records, merged as they arrive (a record's tokens are not kept)."""

    counts: ChunkCounts = field(default_factory=ChunkCounts)
    shards: dict[int, list[ShardRecord]] = field(default_factory=dict)
    worker_max_rss_mb: float = 0.0
    skipped: int = 0
    repaired: int = 0
    seconds: float = 0.0

    def add(self, chunk: int, rec: dict, where: str) -> None:
        self.counts.add_record(rec, where)
        self.shards[chunk] = shards_from_dicts(rec["shards"], where)
        self.worker_max_rss_mb = max(self.worker_max_rss_mb, rec.get("worker_max_rss_mb", 0.0))

    def vocab(self, min_count: int) -> Vocab:
        """From the train split's tokens."""
        return Vocab.build(self.counts.tokens, min_count, self.counts.train_captions)

    def manifest(self, source: str, params: dict, driver: "_Driver", input_files: dict, use_ray: bool) -> Manifest:
        """The manifest of the chunks plus what the driver counted (``driver``)."""
        tally = Tally()
        tally.add(driver.tally)
        tally.add(self.counts.tally)
        splits = {s: SplitCounts() for s in SPLITS}
        for s, c in self.counts.splits.items():
            splits.setdefault(s, SplitCounts()).merge(c)
        drops = DropLog()
        drops.add(driver.drops)
        drops.add(self.counts.drops)
        info = Counter(driver.info)
        info.update(self.counts.info)
        return Manifest(
            source=source, params=params, tally=tally, splits=splits,
            shards=[s for chunk_shards in self.shards.values() for s in chunk_shards],
            info=dict(sorted(info.items())),
            coco_ids={s: sorted(v) for s, v in self.counts.coco_ids.items()},
            input_details={"files": input_files, "image_bytes_read": self.counts.bytes_in},
            sections={"worker_max_rss_mb": round(self.worker_max_rss_mb, 1),
                      "drop_details": drops.to_dict(),
                      "run": {"seconds": round(self.seconds, 3), "chunks": len(self.shards),
                              "chunks_skipped": self.skipped, "chunks_repaired": self.repaired,
                              "ray": use_ray}})


def _write_chunks(source: str, out: str, params: dict, items: Iterable[dict], options: PrepareOptions,
                  total_images: int | None) -> _Chunks:
    """Every item into the shards of its chunk (Ray tasks, or this process), then the
    leftovers of a previous run removed."""
    t0 = time.perf_counter()
    fs, base = fsspec.core.url_to_fs(str(out))
    fs.makedirs(posixpath.join(base, RECORDS), exist_ok=True)
    progress = _Progress(source, total_images, options.progress)
    chunks = _Chunks()

    def on_done(chunk: int, rec: dict, images: int) -> None:
        chunks.add(chunk, rec, record_path(base, chunk))
        progress.update(images)

    def run(ray) -> None:
        runner = _Runner(str(out), params, ray, on_done, check_sha256=options.recheck == "sha256")
        for chunk, batch in _chunked(items, params["chunk_images"]):
            runner.submit(chunk, batch)
        runner.finish()
        chunks.skipped, chunks.repaired = runner.skipped, runner.repaired

    if options.use_ray:
        import ray

        with runtime.ray_session(None, options.address, options.num_cpus, include_dashboard=False,
                                 log_to_driver=False):
            run(ray)
    else:
        run(None)
    progress.close()
    _remove_leftovers(fs, base, chunks.shards)
    chunks.seconds = time.perf_counter() - t0
    return chunks


def _remove_leftovers(fs, base: str, shards: dict[int, list[ShardRecord]]) -> None:
    """Shards and records of chunks this run did not produce (a previous run with other
    inputs), and temporary files a killed run left."""
    listed = {s.name for chunk_shards in shards.values() for s in chunk_shards}
    for p in fs.ls(base, detail=False):
        name = posixpath.basename(p)
        if (SHARD_RE.match(name) and name not in listed) or (name.startswith(".") and ".tmp-" in name):
            fs.rm(p)
    for p in fs.ls(posixpath.join(base, RECORDS), detail=False):
        name = posixpath.basename(p)
        if ".tmp-" in name or (name.startswith("chunk-") and int(name[6:12]) not in shards):
            fs.rm(p)


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


@dataclass
class _Driver:
    """What the driver drops (counted in and dropped at once) and notes before any chunk runs."""

    tally: Tally = field(default_factory=Tally)
    drops: DropLog = field(default_factory=DropLog)
    info: Counter = field(default_factory=Counter)

    def reject(self, reason: str, split: str | None = None, path: str | None = None, images: int = 1,
               regions: int = 0, sentences: int = 0) -> None:
        self.tally.reject(reason, images=images, regions=regions, sentences=sentences)
        if images:
            self.drops.note(split, reason, path)


# what to do about the main reason a split (or the whole input) lost its images
_FIXES = {
    UNSAFE_PATH: "file names must be relative paths that stay under the images root",
    "not_a_file": "the paths name directories, pipes or devices, not image files",
    "too_large": "raise --max-image-bytes if such large files are real images",
    "unreadable_file": "check the files' permissions",
    "corrupt_image": "the files are not decodable images (truncated downloads?)",
    "no_region_entry": "region_descriptions.json has no entry for these images of image_data.json: "
                       "are both files of one VG release?",
    "not_in_image_data": "image_data.json does not list these images: are both files of one VG release?",
    "not_in_split": "the split file names none of these images: check --split-file",
    "unknown_split": "the split values must be train, val, test or restval",
    "bad_element": "the file's elements are not in the expected layout (docs/data.md)",
    "duplicate_image": "the input lists these images twice",
    "no_valid_regions": "none of their regions has a phrase and a box inside the image",
    "no_valid_captions": "none of their sentences has a word left after cleaning",
}
_MISSING_FILE_FIX = {
    "vg": "--root must hold VG_100K/ and VG_100K_2/ (or densecap's images/) with files named <image_id>.jpg",
    "karpathy": "--images-root must be the directory the split file's filepath/filename are relative to "
                "(COCO: the folder holding val2014/ and train2014/, or train2017/ and val2017/)",
}


def _loss(images: int, lost: Mapping[str, int], drops: DropLog, source: str, split: str | None = None) -> str:
    """``images`` in (of ``split``, or all), ``lost`` of them dropped by reason: the main
    reason, the first path tried for it and the fix, in one line."""
    reason, count = max(sorted(lost.items()), key=lambda kv: kv[1])
    path = drops.example(reason, split)
    where = f"first path tried: {path}" if path is not None else "no image file was read for them"
    fix = _MISSING_FILE_FIX[source] if reason == "missing_file" else _FIXES.get(reason, "see docs/data.md")
    return f"{sum(lost.values())} of {images} images dropped, most as {reason} ({count}); {where}; {fix}"


def _check_outcome(manifest: Manifest, empty_input: str) -> list[str]:
    """DataError when no sample was written (``empty_input``: what to say when the input
    lists no image at all); else the warnings about splits that are empty or lost most of
    their images (a default split is drawn before the drops, so a small dataset can end up
    with an empty one). Each is logged and kept in the manifest's ``warnings``."""
    source = manifest.source
    drops = DropLog.from_dict(manifest.sections["drop_details"])
    if manifest.written["images"] == 0:
        images = manifest.tally.inputs["images"]
        story = _loss(images, manifest.dropped("images"), drops, source) if images else empty_input
        raise DataError(f"no samples written: {story}")
    warnings = []
    for split in SPLITS:
        lost = drops.by_split.get(split, Counter())
        images = manifest.split_count(split, "images") + sum(lost.values())
        if images == 0:
            warnings.append(f"split {split}: no images (none of the input's images is in it)")
        elif sum(lost.values()) > LOSS_WARNING * images:
            warnings.append(f"split {split}: {_loss(images, lost, drops, source, split)}")
    for w in warnings:
        log.warning("%s", w)
    manifest.sections["warnings"] = warnings
    return warnings


def _input_files(paths: Iterable[str | None]) -> dict:
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


def _params(source: str, options: PrepareOptions, min_count: int, **inputs) -> dict:
    """What the shards depend on (recorded in the manifest; a change redoes every chunk)."""
    if min_count < 1:
        raise DataError(f"--min-count must be >= 1, got {min_count}")
    return {"source": source, "iou_threshold": IOU_GROUP, "shard_bytes": int(options.shard_bytes),
            "max_side": options.max_side, "min_count": int(min_count), "verify": options.verify,
            "chunk_images": int(options.chunk_images), "max_image_bytes": int(options.max_image_bytes), **inputs}


def _other_coco_ids(shards: str, source: str, splits: tuple[str, ...]) -> set:
    """coco ids of ``splits`` in the manifest of prepared ``source`` shards (the leakage guard)."""
    m = Manifest.read(shards)
    if m.source != source:
        raise DataError(f"{shards}: holds {m.source!r} shards, not {source!r} (the leakage guard "
                        f"compares against prepared {source} shards)")
    return {i for s in splits for i in m.coco_ids.get(s, [])}


# --------------------------------------------------------------------------- VG


def prepare_vg(source: VGSource, out: str, options: PrepareOptions = PrepareOptions()) -> Manifest:
    """Visual Genome (``source``) -> shards under ``out`` (a path or fsspec URL). Returns the
    manifest (also written to ``out/manifest.json``, beside ``vocab.json``)."""
    root = str(source.root).rstrip("/")
    kp_train = _other_coco_ids(source.karpathy_shards, "karpathy", ("train",)) if source.karpathy_shards else None
    params = _params("vg", options, source.min_count,
                     split_file=str(source.split_file) if source.split_file else None)
    image_data = vg.read_image_data(root)
    info = {}
    if source.split_file:
        split_of = load_split_file(source.split_file)
        unknown = [i for i in split_of if i not in image_data]
        info["split_file_unknown_ids"] = len(unknown)
        if unknown:
            log.warning("%s names %d image ids not in image_data.json (e.g. %s): ignored",
                        source.split_file, len(unknown), unknown[:5])
    else:
        n_val, n_test = default_split_sizes(len(image_data), source.val_images, source.test_images)
        params["val_images"], params["test_images"] = n_val, n_test
        split_of = deterministic_split(image_data, n_val, n_test)
    files = _input_files([posixpath.join(root, "image_data.json"), posixpath.join(root, "region_descriptions.json"),
                          source.split_file])

    driver, seen = _Driver(), set[int]()
    chunks = _write_chunks("vg", out, params, _vg_items(root, image_data, split_of, driver, seen), options,
                           total_images=len(image_data))
    # images of image_data.json that region_descriptions.json never mentions
    for i in image_data:
        if i not in seen:
            driver.reject("no_region_entry", split_of.get(i))
    manifest = chunks.manifest("vg", params, driver, files, options.use_ray)
    manifest.info.update(info)
    if kp_train is not None:
        leaked = sorted({i for s in ("val", "test") for i in manifest.coco_ids.get(s, []) if i in kp_train})
        manifest.sections["leakage"] = {"karpathy_shards": str(source.karpathy_shards), "images": len(leaked),
                                        "what": "VG val/test images in the Karpathy train split",
                                        "examples": leaked[:20]}
        if leaked:
            log.warning("leakage: %d VG val/test images are Karpathy train images (coco ids e.g. %s)",
                        len(leaked), leaked[:5])
    _check_outcome(manifest, "image_data.json and region_descriptions.json list no images")
    manifest.write(out, chunks.vocab(params["min_count"]))
    return manifest


def _vg_items(root: str, image_data: dict, split_of: dict, driver: _Driver, seen: set) -> Iterator[dict]:
    """The chunk items of region_descriptions.json; what can be judged without pixels (a bad
    element, a duplicate or unknown image, one outside the split, an unsafe url, a duplicate
    region id) is dropped here and counted in ``driver``; ``seen`` collects every image id met."""
    region_ids = _RegionIds()
    for iid, regions, _ in vg.iter_region_entries(root):
        if iid is None:
            driver.reject("bad_element", regions=len(regions))
            continue
        reason = _vg_image_problem(iid, seen, image_data, split_of)
        seen.add(iid)
        if reason:
            driver.reject(reason, regions=len(regions))
            continue
        meta = image_data[iid]
        candidates = vg.image_candidates(root, iid, meta["relpath"])
        if candidates is None:
            driver.reject(UNSAFE_PATH, split_of[iid], meta["relpath"], regions=len(regions))
            continue
        kept = []
        for r in regions:
            rid = vg.region_id_of(r)
            if rid is not None and not region_ids.add(rid):
                driver.reject("duplicate_region_id", images=0, regions=1)
            else:
                kept.append(r)
        size = [meta["width"], meta["height"]] if _is_size(meta["width"], meta["height"]) else None
        yield {"image_id": iid, "split": split_of[iid], "source": "vg",
               "paths": [p for _, p in candidates], "path_kinds": [how for how, _ in candidates],
               "coco_id": meta["coco_id"], "flickr_id": meta["flickr_id"], "meta_size": size, "regions": kept}


def _vg_image_problem(iid: int, seen: set[int], image_data: dict, split_of: dict) -> str | None:
    if iid in seen:
        return "duplicate_image"
    if iid not in image_data:
        return "not_in_image_data"
    if iid not in split_of:
        return "not_in_split"
    return None


def _is_size(w, h) -> bool:
    return isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0


# --------------------------------------------------------------------------- Karpathy


def prepare_karpathy(source: KarpathySource, out: str, options: PrepareOptions = PrepareOptions()) -> Manifest:
    """A Karpathy split file and its images (``source``) -> shards under ``out``; returns the
    manifest (also written to ``out/manifest.json``, beside ``vocab.json``)."""
    params = _params("karpathy", options, source.min_count,
                     proposals=str(source.proposals) if source.proposals else None)
    files = _input_files([source.json_path, source.proposals])
    kp.check_layout(source.json_path)
    props = _matched_proposals(source)
    vg_eval = _other_coco_ids(source.vg_shards, "vg", ("val", "test")) if source.vg_shards else set()
    driver, leaked = _Driver(), list[int]()
    items = _karpathy_items(source, props, vg_eval, driver, leaked)
    chunks = _write_chunks("karpathy", out, params, items, options, total_images=None)
    if props is not None:
        driver.info["proposals_unmatched_keys"] = props.keys - len(props.matched)
    manifest = chunks.manifest("karpathy", params, driver, files, options.use_ray)
    if source.vg_shards:
        manifest.sections["leakage"] = {"vg_shards": str(source.vg_shards), "images": len(leaked),
                                        "what": "Karpathy train images in the VG val/test splits",
                                        "examples": sorted(leaked)[:20]}
        if leaked:
            log.warning("leakage: %d Karpathy train images are VG val/test images (coco ids e.g. %s)",
                        len(leaked), sorted(leaked)[:5])
    # only the train coco ids matter downstream (the leakage guard of the other direction)
    manifest.coco_ids = {"train": manifest.coco_ids.get("train", [])}
    _check_outcome(manifest, f"{source.json_path} lists no images")
    manifest.write(out, chunks.vocab(params["min_count"]))
    return manifest


def _matched_proposals(source: KarpathySource) -> kp.Proposals | None:
    """The ``--proposals`` file, its keys matched against the split file's images in one pass
    first: DataError when none matches (ids of another dataset, say), before any work."""
    if not source.proposals:
        return None
    props = kp.Proposals(kp.load_proposals(source.proposals), str(source.proposals))
    for _, e in kp.iter_karpathy(source.json_path):
        if isinstance(e, dict):
            props.boxes_for(e)
    props.check_any_match(source.json_path)
    return props


def _karpathy_items(source: KarpathySource, props: kp.Proposals | None, vg_eval: set, driver: _Driver,
                    leaked: list[int]) -> Iterator[dict]:
    """The chunk items of the split file; a bad element, a duplicate image, an unknown split
    or an unsafe file name is dropped here and counted in ``driver``; train images among
    ``vg_eval`` (coco ids) are collected in ``leaked``."""
    images_root = str(source.images_root).rstrip("/")
    seen: set[int] = set()
    for _, e in kp.iter_karpathy(source.json_path):
        sents = e.get("sentences") if isinstance(e, dict) else None
        raw = [_sentence_raw(s) for s in sents] if isinstance(sents, list) else []
        iid = kp.image_id_of(e) if isinstance(e, dict) else None
        split = kp.SPLIT_MAP.get(str(e.get("split"))) if isinstance(e, dict) else None
        rel = kp.image_relpath(e) if isinstance(e, dict) else None
        if iid is None or rel is None or not isinstance(sents, list):
            driver.reject("bad_element", sentences=len(raw))
            continue
        if iid in seen:
            driver.reject("duplicate_image", sentences=len(raw))
            continue
        if split is None:
            driver.reject("unknown_split", sentences=len(raw))
            continue
        seen.add(iid)
        candidates = _karpathy_candidates(images_root, e)
        if candidates is None:
            driver.reject(UNSAFE_PATH, split, rel, sentences=len(raw))
            continue
        cocoid = e.get("cocoid")
        if split == "train" and cocoid is not None and cocoid in vg_eval:
            leaked.append(cocoid)
        item = {"image_id": iid, "split": split, "source": "karpathy",
                "paths": [p for _, p in candidates], "path_kinds": [how for how, _ in candidates],
                "coco_id": cocoid, "file_name": e["filename"], "meta_size": None, "regions": [], "sentences": raw}
        if props is not None:
            item["proposals"] = _proposals_of(props, e, driver)
        yield item


def _karpathy_candidates(images_root: str, e: dict) -> list[tuple[str, str]] | None:
    """``(how, path)`` for each place the image may be (:func:`kp.image_relpaths`); None when
    its file name would leave the images root (absolute, ``..``)."""
    out = []
    for how, rel in kp.image_relpaths(e):
        p = safe_join(images_root, rel)
        if p is None:
            return None
        out.append((how, p))
    return out


def _proposals_of(props: kp.Proposals, e: dict, driver: _Driver) -> list:
    boxes = props.boxes_for(e)
    if not isinstance(boxes, list):
        driver.info["images_without_proposals"] += 1
        return []
    return boxes


def _sentence_raw(s):
    """A sentence's raw text (``raw``, else its ``tokens`` joined); None when it has neither."""
    if isinstance(s, dict):
        if isinstance(s.get("raw"), str):
            return s["raw"]
        if isinstance(s.get("tokens"), list) and all(isinstance(t, str) for t in s["tokens"]):
            return " ".join(s["tokens"])
    return None


# --------------------------------------------------------------------------- summary


def summary(manifest: Manifest) -> str:
    """A few lines: per-split counts, drops by reason, vocab, time."""
    lines = [f"{'split':<6} {'images':>9} {'regions':>10} {'groups':>9} {'sentences':>10} {'shards':>7}"]
    for s, c in manifest.splits.items():
        lines.append(f"{s:<6} {c.images:>9} {c.regions:>10} {c.groups:>9} {c.sentences:>10} "
                     f"{manifest.split_count(s, 'shards'):>7}")
    for kind in KINDS:
        reasons = manifest.dropped(kind)
        if reasons:
            lines.append(f"dropped {kind}: " + ", ".join(f"{r}={n}" for r, n in reasons.items()))
    if manifest.info:
        lines.append("notes: " + ", ".join(f"{k}={v}" for k, v in manifest.info.items()))
    lines += [f"warning: {w}" for w in manifest.sections.get("warnings", [])]
    if manifest.vocab is not None:
        lines.append(f"vocab: {manifest.vocab.size} words (min count {manifest.vocab.min_count})")
    leakage = manifest.sections.get("leakage")
    if leakage:
        lines.append(f"leakage guard: {leakage['images']} {leakage['what']}")
    run = manifest.sections.get("run", {})
    inputs = manifest.tally.inputs
    repaired = run.get("chunks_repaired", 0)
    redone = f", {repaired} redone: their shards were missing or changed" if repaired else ""
    lines.append(f"inputs balance: images {inputs['images']}, regions {inputs['regions']}, "
                 f"sentences {inputs['sentences']} = written + dropped; {run.get('chunks', 0)} chunks "
                 f"({run.get('chunks_skipped', 0)} already done{redone}) in {run.get('seconds', 0):.1f}s")
    return "\n".join(lines)
