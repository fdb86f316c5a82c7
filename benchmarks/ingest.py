"""Ingest throughput: the Ray Data pipeline vs webdataset + torch DataLoader, same shards, same CPUs.

Every arm does the same work per image: read the tar, parse the json, check the boxes, draw the
regions (seeded, as for a train split), decode the JPEG, resize to S x S (uint8 CHW), map the
region boxes, encode the region captions, pad, and hand the train loop torch batches of B rows.
The DataLoader arms call the Ray arms' per-sample code (``BatchBuilder._checked_row``) under the
same spec (``dvsa.ingest.dataset.ingest_spec``). Arms:

  dataloader_full   webdataset + DataLoader(num_workers=C), PIL full-size decode + resize
                    (what one writes by default: the baseline)
  dataloader_draft  the same, with our reduced-size decode (PIL draft): ray_pil's decode
  dataloader_torchvision  the same, with torchvision.io.decode_jpeg + resize: ray_torchvision's
  ray_pil           build_dataset (ShardDatasource read -> map_batches tasks, PIL draft)
                    -> iter_train_batches (local shuffle buffer off; --shuffle-buffer N: dvsa.ingest.row_shuffle
                    on the Ray arms, webdataset's shuffle of raw samples on the DataLoader arms)
  ray_torchvision   the same with torchvision.io.decode_jpeg + v2 resize
  ray_actors        the same as ray_pil with an actor pool of C decoders (the read is fused
                    into the actors, so it needs no CPU of its own)
  ray_pil_no_reservation  diagnostic, not a product setting: ray_pil with Ray Data's operator
                    resource reservation off (``DataContext.op_resource_reservation_enabled``),
                    so that no resource budget holds a pass's tasks back. Ray Data 2.60 starts
                    every pass at one task for ~1 s (dvsa.ingest.warmup); dvsa's fix keeps the
                    reservation and refreshes the limits every 0.1 s. With
                    ``DVSA_RAY_DATA_LIMITS_REFRESH_S=1`` (Ray's own interval) this arm shows what
                    the first second costs; without it, that the fix recovers it.
  ray_pil_threaded_metadata  diagnostic, not a product setting: ray_pil with Ray Data's default
                    threaded block-metadata fetcher, which emits each block one scheduling step
                    (up to 0.1 s) after the executor sees it; dvsa fetches it inline
                    (dvsa.ingest.warmup). Shows what that step costs at a pass's ends.
  ray_pil_iter_torch_batches  diagnostic: ray_pil's dataset consumed through Ray's own
                    ``iter_torch_batches`` (what Ray's examples do, and dvsa did before) instead
                    of ``iter_batches`` + ``torch.from_numpy`` (dvsa.ingest.torch_batches).
  ray_pil_constant_refresh  diagnostic: ray_pil with the resource limits refreshed every 0.1 s
                    all pass long (each refresh an actor call), where dvsa refreshes that often
                    only until a pass's limits are known (dvsa.ingest.warmup.RefreshInterval).
  ray_pil_unawaited_first_answer  diagnostic: ray_pil where a pass starts on the autoscaling
                    coordinator's empty cache, as Ray's does (one task until the next loop step),
                    where dvsa waits for the coordinator's first answer of a pass
                    (dvsa.ingest.warmup.await_first_reservation).
  ray_pil_ray_shuffle  diagnostic (with --shuffle-buffer): ray_pil's rows drawn through Ray Data's
                    own local shuffle buffer (``iter_batches(local_shuffle_buffer_size=...)``),
                    where dvsa draws them through dvsa.ingest.row_shuffle (one copy per row).

The figure to read is ``ratio_vs_dataloader_same_decode``: each Ray arm's rows/s over the
DataLoader arm that decodes the same way (ray_pil and ray_actors: dataloader_draft;
ray_torchvision: dataloader_torchvision), both medians of the same interleaved run. Also
reported: rows/s per CPU, the first batch's latency and the rate after it, and rows per
CPU-second of the whole process tree (this process, its DataLoader workers, Ray's GCS, raylet
and workers, from /proc; ``..._per_cpu_second``), which other load on a shared host barely moves.

Each arm's pipeline object is built once and iterated once per pass, as epochs are (the
DataLoader with persistent workers, the Ray Dataset as a TorchTrainer holds it). All arms run
in one process run, interleaved (rep 1: every arm, rep 2: every arm, ...), after
one warm-up pass each, so that load from other processes on the machine hits all arms alike.
Caveat (measured): with ray_actors in the run, the other Ray arms' first batch takes 1.5-3 s
(17-70 s on a host at load average 70-90), without it 0.3-0.4 s: Ray keeps at most C idle
worker processes (its ``num_workers_soft_limit``), so the actor pool's workers push the task
arms' warm workers out, and every later task pass starts fresh processes. ``--idle-workers``
(default 4 x C) raises that limit for the benchmark's Ray, so that the arms stop restarting each
other's workers (0: Ray's default). Compare task arms with --arms too.
Ray is started with num_cpus=C; the DataLoader uses C worker processes. Both arms' workers run
at the same niceness: Ray starts its workers at nice 15 (its ``worker_niceness``), the
DataLoader's inherit this process's 0, and on a shared host the nice-0 processes take the CPU
from the nice-15 ones (and are interrupted less), so ``--worker-niceness`` (default 0,
recorded in the JSON) sets Ray's. Both arms hand the train loop batches of B rows; the Ray
arms' blocks hold ``--decode-batch-size`` rows (``data.decode_batch_size``, default 4 x B: the
executor's, raylet's and iterator's costs are per block). The CPU seconds of each pass are also
split by process (driver, DataLoader workers, Ray workers, Ray's actors and agents, raylet, GCS:
``cpu_seconds_by_process``).

    .venv/bin/python benchmarks/ingest.py [--images 960] [--size 224] [--cpus 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = "a the red blue green man woman dog cat tree car sign window shirt white black on in of with".split()


def _photo_like(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A 'photo-like' JPEG (smooth gradients, shapes, mild noise) of about real-photo size."""
    from PIL import Image, ImageDraw, ImageFilter

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(xx / w) * 255 * rng.random(), (yy / h) * 255 * rng.random(),
                     ((xx + yy) / (w + h)) * 255 * rng.random()], -1)
    im = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        d.ellipse([x, y, x + int(rng.integers(20, 200)), y + int(rng.integers(20, 200))],
                  fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    im = im.filter(ImageFilter.GaussianBlur(1))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_bench_shards(root: str, images: int, width: int = 640, height: int = 480, regions: int = 12,
                      shard_images: int = 60, seed: int = 0, unique: int = 64) -> str:
    """``images`` samples (``unique`` distinct JPEGs reused) in train shards + vocab.json."""
    from dvsa.data.shards import ShardWriter
    from dvsa.text import Vocab

    rng = np.random.default_rng(seed)
    jpgs = [_photo_like(rng, width, height) for _ in range(min(unique, images))]
    counter: Counter = Counter()
    per_shard_bytes = shard_images * (len(jpgs[0]) + 2000)
    with ShardWriter(root, "train", shard_bytes=per_shard_bytes) as w:
        for i in range(images):
            regs = []
            for j in range(regions):
                x1, y1 = float(rng.integers(0, width - 60)), float(rng.integers(0, height - 60))
                toks = [WORDS[k] for k in rng.integers(0, len(WORDS), int(rng.integers(2, 9)))]
                counter.update(toks)
                regs.append({"id": i * 100 + j, "box": [x1, y1, x1 + 50, y1 + 50], "raw": " ".join(toks),
                             "tokens": toks})
            sentence = {"raw": regs[0]["raw"], "tokens": regs[0]["tokens"]}   # for the alignment model's rows
            w.write(f"im{i:07d}", jpgs[i % len(jpgs)],
                    {"image_id": i, "source": "vg", "split": "train", "width": width, "height": height,
                     "regions": regs, "groups": [], "sentences": [sentence]})
    Vocab.build(counter, 1, images * regions).save(os.path.join(root, "vocab.json"))
    return root


# --------------------------------------------------------------------------- CPU accounting


def _proc_stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds: user + system + those of its reaped children) from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:          # gone, or not Linux
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / ticks


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_role(pid: int, root: int, root_cmdline: str) -> str:
    """What a process of this run's tree is: ``driver`` (this process: the DataLoader's main
    loop, or Ray Data's executor and iterator threads), ``dataloader_workers`` (forked
    DataLoader workers), ``ray_workers`` (Ray task workers: the decode tasks), ``ray_actors``
    (Ray Data's stats and autoscaling actors, the skip counter, Ray's agents), ``raylet``,
    ``gcs``, ``other``."""
    if pid == root:
        return "driver"
    cmd = _cmdline(pid)
    if "raylet" in cmd.split(" ")[0]:
        return "raylet"
    if "gcs_server" in cmd.split(" ")[0]:
        return "gcs"
    if cmd.startswith("ray::"):
        name = cmd[5:].split(" ")[0]
        actor = name.startswith("_") or name.endswith(("Actor", "Agent")) or "Actor." in name
        return "ray_actors" if actor else "ray_workers"
    if cmd == root_cmdline:
        return "dataloader_workers"
    return "other"


def tree_cpu_by_process(root: int | None = None) -> dict[int, tuple[str, float]]:
    """``{pid: (role, CPU seconds so far)}`` of this process and all its descendants
    (:func:`process_role`; DataLoader workers, and Ray's GCS, raylet and workers, which
    ``ray.init`` starts below this process). Robust to other load on the host, unlike wall
    time; an exited process counts through its parent's reaped-children time."""
    root = os.getpid() if root is None else root
    stats = {int(p): st for p in os.listdir("/proc") if p.isdigit() and (st := _proc_stat(p)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    root_cmd = _cmdline(root)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = (process_role(pid, root, root_cmd), stats[pid][1])
        todo.extend(children.get(pid, []))
    return out


def cpu_split(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds used between two :func:`tree_cpu_by_process` snapshots, by role."""
    out: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        out[role] = out.get(role, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
    return out


# --------------------------------------------------------------------------- the DataLoader arm


class _WdsRows:
    """webdataset pipeline stage: raw sample -> the row the Ray arms' builder makes of it, by the
    same per-sample code (``BatchBuilder._checked_row``: json, box checks, the training set's
    seeded draw of regions, decode, boxes, tokens) under the same spec (``ingest_spec`` of the
    Ray arms' config, ``randomize=True`` as for a train split). ``decoder``: ``full`` (PIL
    full-size decode + resize) or a ``data.jpeg_decoder`` of the Ray arms. The draws use pass 0
    every pass (a DataLoader worker does not know the epoch); what they cost does not depend on it."""

    def __init__(self, spec, vocab, decoder: str):
        self.spec, self.vocab, self.decoder = spec, vocab, decoder
        self._builder = None

    def __call__(self, sample):
        from dvsa.data.shards import RawSample
        from dvsa.ingest.builder import BatchBuilder

        if self._builder is None:            # made in the worker, on its first sample
            full = self.decoder == "full"
            self._builder = BatchBuilder(replace(self.spec, decoder="pil" if full else self.decoder), self.vocab)
            if full:
                self._builder._decode = lambda jpg, out: _decode_full(jpg, self.spec.image_size)
        raw = RawSample(sample["__key__"], sample["jpg"], json.loads(sample["json"]), "")
        return self._builder._checked_row(raw, 0)


def _decode_full(jpg: bytes, size: int):
    """The decode a user writes by default: PIL at full size, then the same bilinear resize."""
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as im:
        w, h = im.size
        rgb = im.convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(rgb).transpose(2, 0, 1).copy(), (w, h)


def _collate(rows):
    import torch

    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0] if not k.startswith("__")}


def make_loader(urls, spec, vocab, batch_size, workers, decoder, shuffle_buffer: int = 0):
    """One DataLoader reused across passes (persistent workers), as one trains epochs.
    ``shuffle_buffer`` > 0: raw samples drawn through webdataset's shuffle buffer of that many
    samples in each worker (filled before the first draw), as the Ray arms' rows are."""
    import torch
    import webdataset as wds

    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, initial=shuffle_buffer)
    ds = ds.map(_WdsRows(spec, vocab, decoder)).batched(batch_size, collation_fn=_collate, partial=True)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=2,
                                       persistent_workers=True)


def run_dataloader(loader) -> tuple[int, float]:
    n, t0, first = 0, time.perf_counter(), None
    for batch in loader:
        n += batch["images"].shape[0]
        first = first if first is not None else time.perf_counter() - t0
    return n, first


# --------------------------------------------------------------------------- the Ray arm


def run_ray(ds, batch_size, threaded_metadata: bool = False, torch_batches: bool = False,
            constant_refresh: float = 0.0, unawaited_first_answer: bool = False,
            shuffle_buffer: int = 0, ray_shuffle: bool = False) -> tuple[int, float]:
    """One pass over a Dataset built once and reused across passes, as a TorchTrainer does,
    through ``dvsa.ingest.iter_train_batches``. Diagnostics (each restored after the pass; the
    executor of this pass reads them when it starts): ``threaded_metadata``, Ray Data's default
    metadata fetcher; ``torch_batches``, batches from Ray's ``iter_torch_batches`` instead;
    ``constant_refresh`` > 0, the resource limits refreshed at that interval all pass long;
    ``unawaited_first_answer``, the pass starts on the coordinator's empty cache, as Ray's does.
    ``shuffle_buffer`` > 0: rows drawn through ``iter_train_batches``' shuffle buffer of that many
    rows (dvsa.ingest.row_shuffle; the training default is 256); ``ray_shuffle``, through Ray
    Data's local shuffle buffer instead."""
    from ray.data._internal.execution import metadata_fetcher
    from ray.data._internal.execution.resource_manager import ResourceManager

    from dvsa.ingest import iter_train_batches, warmup
    from dvsa.ingest.torch_batches import _tensors

    dvsa_setting = metadata_fetcher._PREFETCH_ON_THREAD
    dvsa_refresh = ResourceManager.__dict__["GLOBAL_LIMITS_UPDATE_INTERVAL_S"]
    dvsa_wait = warmup.FIRST_ANSWER_WAIT_S
    metadata_fetcher._PREFETCH_ON_THREAD = threaded_metadata or dvsa_setting
    if constant_refresh:
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = constant_refresh
    if unawaited_first_answer:
        warmup.FIRST_ANSWER_WAIT_S = 0.0
    try:
        if ray_shuffle and shuffle_buffer:
            batches = (_tensors(b, False) for b in ds.iter_batches(
                batch_size=batch_size, batch_format="numpy", prefetch_batches=2,
                local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=0))
        elif torch_batches:
            batches = ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=2,
                                            local_shuffle_buffer_size=shuffle_buffer or None)
        else:
            batches = iter_train_batches(ds, batch_size, "cpu", prefetch_batches=2, epoch=0, seed=0,
                                         shuffle_buffer=shuffle_buffer)
        n, t0, first = 0, time.perf_counter(), None
        for batch in batches:
            n += batch["images"].shape[0]
            first = first if first is not None else time.perf_counter() - t0
    finally:
        metadata_fetcher._PREFETCH_ON_THREAD = dvsa_setting
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = dvsa_refresh
        warmup.FIRST_ANSWER_WAIT_S = dvsa_wait
    return n, first


#: the DataLoader arms and their decode (``full``: PIL full-size decode + resize)
LOADER_DECODERS = {"dataloader_full": "full", "dataloader_draft": "pil", "dataloader_torchvision": "torchvision"}
#: each Ray arm's DataLoader arm with the same decode
SAME_DECODE = {"ray_pil": "dataloader_draft", "ray_actors": "dataloader_draft",
               "ray_torchvision": "dataloader_torchvision", "ray_pil_no_reservation": "dataloader_draft",
               "ray_pil_threaded_metadata": "dataloader_draft", "ray_pil_iter_torch_batches": "dataloader_draft",
               "ray_pil_constant_refresh": "dataloader_draft", "ray_pil_unawaited_first_answer": "dataloader_draft",
               "ray_pil_ray_shuffle": "dataloader_draft"}
ARMS = ("dataloader_full", "dataloader_draft", "dataloader_torchvision", "ray_pil", "ray_torchvision", "ray_actors",
        "ray_pil_no_reservation", "ray_pil_threaded_metadata", "ray_pil_iter_torch_batches", "ray_pil_constant_refresh",
        "ray_pil_unawaited_first_answer", "ray_pil_ray_shuffle")
#: the diagnostic ray_pil arms and what each changes for its passes (run_ray's keywords)
RAY_DIAGNOSTICS = {"ray_pil_threaded_metadata": {"threaded_metadata": True},
                   "ray_pil_iter_torch_batches": {"torch_batches": True},
                   "ray_pil_constant_refresh": {"constant_refresh": 0.1},
                   "ray_pil_unawaited_first_answer": {"unawaited_first_answer": True},
                   "ray_pil_ray_shuffle": {"ray_shuffle": True}}


def same_decode_ratios(rate: dict[str, float]) -> dict[str, float]:
    """rows/s of each Ray arm over its same-decode DataLoader arm's (both measured in this run)."""
    return {k: rate[k] / rate[ref] for k, ref in SAME_DECODE.items() if k in rate and ref in rate}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=960)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="ingest.json", help="file name under benchmarks/results/")
    ap.add_argument("--idle-workers", type=int, default=None,
                    help="Ray's num_workers_soft_limit (idle workers kept), default 4 x --cpus; 0: Ray's default")
    ap.add_argument("--decode-batch-size", type=int, default=None,
                    help="the Ray arms' data.decode_batch_size (rows per output block), default 4 x --batch-size")
    ap.add_argument("--worker-niceness", type=int, default=0,
                    help="Ray's worker_niceness for the benchmark's Ray (Ray's default is 15); 0: the DataLoader "
                         "workers' niceness, so that other load on a shared host treats both arms alike; "
                         "-1: Ray's default")
    ap.add_argument("--shuffle-buffer", type=int, default=0,
                    help="rows drawn through a shuffle buffer of this many rows on every arm (Ray: dvsa's "
                         "row shuffle buffer, as training does with 256, or Ray Data's in ray_pil_ray_shuffle; "
                         "DataLoader: webdataset's shuffle of raw samples in each worker); 0: read order")
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args()

    import ray

    load_before = os.getloadavg()
    from dvsa.config import Config
    from dvsa.data.shards import list_shards, load_vocab
    from dvsa.ingest.dataset import ingest_spec

    work = tempfile.mkdtemp(prefix="dvsa-bench-ingest-", dir="/tmp")
    try:
        root = make_bench_shards(os.path.join(work, "shards"), args.images)
        urls = list_shards(root, "train")
        vocab = load_vocab(root)
        decode_batch = args.decode_batch_size or 4 * args.batch_size
        base = {"data.image_size": args.size, "data.decode_concurrency": args.cpus,
                "data.decode_batch_size": decode_batch, "caption.max_regions_per_image": 10}
        cfgs = {
            "ray_pil": Config().replace(**base),
            "ray_torchvision": Config().replace(**base, **{"data.jpeg_decoder": "torchvision"}),
            # the read runs inside the actors (fused): all C CPUs decode
            "ray_actors": Config().replace(**{**base, "data.decode_pool": "actors"}),
            "ray_pil_no_reservation": Config().replace(**base),
            **{k: Config().replace(**base) for k in RAY_DIAGNOSTICS},
        }
        # the DataLoader arms' per-sample work: the Ray arms' (a train split: seeded draws)
        spec = ingest_spec("caption_region", Config().replace(**base), seed=0, epoch=0, randomize=True)
        idle_workers = 4 * args.cpus if args.idle_workers is None else args.idle_workers
        if idle_workers:   # read by the raylet at start (RayConfig num_workers_soft_limit)
            os.environ["RAY_num_workers_soft_limit"] = str(idle_workers)
        if args.worker_niceness >= 0:   # read by the raylet at start (RayConfig worker_niceness)
            os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
        ray.init(num_cpus=args.cpus, include_dashboard=False, _temp_dir=os.path.join(work, "ray"),
                 log_to_driver=False, configure_logging=False)
        from dvsa.ingest import build_dataset

        wanted = args.arms.split(",")
        loaders = {k: make_loader(urls, spec, vocab, args.batch_size, args.cpus, LOADER_DECODERS[k],
                                  args.shuffle_buffer)
                   for k in LOADER_DECODERS if k in wanted}
        datasets = {k: build_dataset(root, "train", "caption_region", c, vocab, seed=0)
                    for k, c in cfgs.items() if k in wanted}
        if "ray_pil_no_reservation" in datasets:    # this dataset's own context (a copy) only
            datasets["ray_pil_no_reservation"].context.op_resource_reservation_enabled = False
        arms = {**{k: (lambda l=l: run_dataloader(l)) for k, l in loaders.items()},
                **{k: (lambda d=d, k=k: run_ray(d, args.batch_size, shuffle_buffer=args.shuffle_buffer,
                                                 **RAY_DIAGNOSTICS.get(k, {})))
                   for k, d in datasets.items()}}
        arms = {k: arms[k] for k in wanted}
        times: dict[str, list[float]] = {k: [] for k in arms}
        firsts: dict[str, list[float]] = {k: [] for k in arms}
        cpu_s: dict[str, list[float]] = {k: [] for k in arms}
        split: dict[str, list[dict[str, float]]] = {k: [] for k in arms}
        for k, fn in arms.items():           # warm-up pass (worker start-up, page cache)
            assert fn()[0] == args.images, k
        for _ in range(args.reps):
            for k, fn in arms.items():
                t, c = time.perf_counter(), tree_cpu_by_process()
                n, first = fn()
                times[k].append(time.perf_counter() - t)
                by_role = cpu_split(c, tree_cpu_by_process())
                split[k].append(by_role)
                cpu_s[k].append(sum(by_role.values()))
                firsts[k].append(first)
                assert n == args.images, (k, n)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rate = {k: args.images / statistics.median(v) for k, v in times.items()}
    first_s = {k: statistics.median(v) for k, v in firsts.items()}
    # after the first batch: the steady rate a long epoch sees
    steady = {k: (args.images - args.batch_size) / max(1e-9, statistics.median(
        [t - f for t, f in zip(times[k], firsts[k])])) for k in times}
    ref = rate.get("dataloader_full")
    same = same_decode_ratios(rate)
    per_cpu = {k: r / args.cpus for k, r in rate.items()}
    # rows per CPU-second of the whole process tree: what each pipeline costs, whatever else runs
    rows_per_cpu_s = {k: args.images / statistics.median(v) for k, v in cpu_s.items()}
    same_cpu = {k: rows_per_cpu_s[k] / rows_per_cpu_s[ref] for k, ref in SAME_DECODE.items()
                if k in rows_per_cpu_s and ref in rows_per_cpu_s}
    roles = sorted({r for v in split.values() for d in v for r in d})
    split_median = {k: {r: statistics.median([d.get(r, 0.0) for d in v]) for r in roles} for k, v in split.items()}
    print(f"\ningest: {args.images} images 640x480 -> {args.size}, {args.cpus} CPUs, batch {args.batch_size}, "
          f"median of {args.reps} interleaved passes"
          + (f", shuffle buffer {args.shuffle_buffer} rows" if args.shuffle_buffer else ""))
    print(f"{'arm':<24}{'rows/s':>9}{'rows/s/CPU':>12}{'vs same decode':>22}{'vs full decode':>16}"
          f"{'1st batch s':>13}{'steady rows/s':>15}{'rows/CPU-s':>12}{'same, CPU-s':>13}")
    for k, r in rate.items():
        a = f"{same[k]:.2f}x ({SAME_DECODE[k].split('_')[1]})" if k in same else "-"
        b = f"{r / ref:.2f}x" if ref else "-"
        c = f"{same_cpu[k]:.2f}x" if k in same_cpu else "-"
        print(f"{k:<24}{r:>9.1f}{per_cpu[k]:>12.1f}{a:>22}{b:>16}{first_s[k]:>13.2f}{steady[k]:>15.1f}"
              f"{rows_per_cpu_s[k]:>12.1f}{c:>13}")
    print(f"\nCPU seconds per pass by process (medians): {', '.join(roles)}, total")
    for k, d in split_median.items():
        print(f"{k:<24}" + "".join(f"{d[r]:>10.2f}" for r in roles) + f"{sum(d.values()):>10.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = {"images": args.images, "image": "640x480 JPEG q90", "size": args.size, "cpus": args.cpus,
           "batch_size": args.batch_size, "reps": args.reps, "interleaved": True,
           "machine": f"{platform.machine()} {os.cpu_count()} cores (shared with other processes)",
           "load_average_before": load_before, "load_average": os.getloadavg(),
           "ray_idle_workers": idle_workers or "ray default",
           "ray_worker_niceness": args.worker_niceness if args.worker_niceness >= 0 else "ray default",
           "ray_decode_batch_size": decode_batch, "shuffle_buffer": args.shuffle_buffer,
           "command": " ".join(["benchmarks/ingest.py"] + sys.argv[1:]),
           "seconds": times, "first_batch_s": firsts, "rows_per_s": rate, "rows_per_s_per_cpu": per_cpu,
           "steady_rows_per_s": steady, "first_batch_s_median": first_s,
           "same_decode_arm": {k: v for k, v in SAME_DECODE.items() if k in rate},
           "ratio_vs_dataloader_same_decode": same,
           "cpu_seconds": cpu_s, "rows_per_cpu_second": rows_per_cpu_s,
           "cpu_seconds_by_process": split, "cpu_seconds_by_process_median": split_median,
           "ratio_vs_dataloader_same_decode_per_cpu_second": same_cpu,
           "ratio_vs_dataloader_full": {k: r / ref for k, r in rate.items()} if ref else None}
    (RESULTS / args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
