"""Streaming, not loading: object-store peak and worker RSS over N and 10N images.

Runs the training ingest (build_dataset -> iter_train_batches, caption_region, the shuffle
buffer on) over a dataset of N images and over one of 10N, while a sampler thread polls every
0.1 s: the object store's bytes in use (the raylet's store stats) and the RSS of every Ray
worker process (/proc). If the pipeline streams, both peaks stay about the same at 10x the data;
if it loaded the dataset they would grow ~10x. The consumer sleeps a little per batch, like a
train step, so the producer runs ahead as far as Ray Data's backpressure lets it.

    .venv/bin/python benchmarks/ingest_memory.py [--images 300] [--factor 10] [--cpus 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1024 * 1024


def _bench_ingest():
    spec = importlib.util.spec_from_file_location("bench_ingest", Path(__file__).with_name("ingest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ray_worker_pids() -> list[int]:
    """Ray worker processes (``ray::...`` / default_worker.py) started under this process."""
    me = os.getpid()
    parent = {}
    cmd = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd[int(d)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue

    def descends(pid):
        seen = 0
        while pid in parent and seen < 50:
            if parent[pid] == me:
                return True
            pid, seen = parent[pid], seen + 1
        return False

    return [p for p, c in cmd.items() if ("ray::" in c or "default_worker.py" in c) and descends(p)]


class Sampler(threading.Thread):
    def __init__(self, period: float = 0.1):
        super().__init__(daemon=True)
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        self._reply = lambda: get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        self.period = period
        self.stop_flag = threading.Event()
        self.store_peak = 0
        self.worker_rss_peak = 0        # the largest single worker
        self.worker_rss_sum_peak = 0    # all workers together
        self.driver_rss_peak = 0
        self.samples = 0
        self.store_errors = 0

    def run(self):
        while not self.stop_flag.is_set():
            try:
                used = int(self._reply().store_stats.object_store_bytes_used)
            except Exception:  # the raylet did not answer this time
                used = 0
                self.store_errors += 1
            rss = [_rss(p) for p in _ray_worker_pids()]
            self.store_peak = max(self.store_peak, used)
            self.worker_rss_peak = max(self.worker_rss_peak, max(rss, default=0))
            self.worker_rss_sum_peak = max(self.worker_rss_sum_peak, sum(rss))
            self.driver_rss_peak = max(self.driver_rss_peak, _rss(os.getpid()))
            self.samples += 1
            self.stop_flag.wait(self.period)


def measure(root: str, cfg, vocab, batch_size: int, step_s: float) -> dict:
    from dvsa.ingest import build_dataset, iter_train_batches

    ds = build_dataset(root, "train", "caption_region", cfg, vocab, seed=0)
    sampler = Sampler()
    sampler.start()
    t, n = time.perf_counter(), 0
    for batch in iter_train_batches(ds, batch_size, "cpu", prefetch_batches=2, epoch=0, seed=0,
                                    shuffle_buffer=cfg.data.shuffle_buffer):
        n += batch["images"].shape[0]
        time.sleep(step_s)
    elapsed = time.perf_counter() - t
    time.sleep(0.3)
    sampler.stop_flag.set()
    sampler.join()
    return {"rows": n, "seconds": elapsed, "object_store_peak_mib": sampler.store_peak / MiB,
            "worker_rss_peak_mib": sampler.worker_rss_peak / MiB,
            "worker_rss_sum_peak_mib": sampler.worker_rss_sum_peak / MiB,
            "driver_rss_peak_mib": sampler.driver_rss_peak / MiB, "samples": sampler.samples,
            "store_sample_errors": sampler.store_errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300, help="N")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--step-ms", type=float, default=5.0, help="simulated train step per batch")
    args = ap.parse_args()

    import ray

    from dvsa.config import Config
    from dvsa.data.shards import load_vocab

    bench = _bench_ingest()
    work = tempfile.mkdtemp(prefix="dvsa-bench-mem-", dir="/tmp")
    sizes = [args.images, args.images * args.factor]
    results = {}
    try:
        cfg = Config().replace(**{"data.image_size": args.size, "data.decode_concurrency": args.cpus,
                                  "data.decode_batch_size": args.batch_size,
                                  "caption.max_regions_per_image": 10})
        roots = {n: bench.make_bench_shards(os.path.join(work, f"n{n}"), n) for n in sizes}
        ray.init(num_cpus=args.cpus, include_dashboard=False, _temp_dir=os.path.join(work, "ray"),
                 log_to_driver=False, configure_logging=False,
                 object_store_memory=512 * MiB)
        # warm-up on the small set (worker start-up), then N and 10N
        measure(roots[sizes[0]], cfg, load_vocab(roots[sizes[0]]), args.batch_size, 0)
        for n in sizes:
            results[n] = measure(roots[n], cfg, load_vocab(roots[n]), args.batch_size, args.step_ms / 1000)
            assert results[n]["rows"] == n, results[n]
            shard_mib = sum(os.path.getsize(os.path.join(roots[n], f)) for f in os.listdir(roots[n])) / MiB
            results[n]["shards_mib"] = shard_mib
            results[n]["decoded_mib"] = n * 3 * args.size * args.size / MiB
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ningest memory: 640x480 JPEGs -> {args.size}, {args.cpus} CPUs, object store capped at 512 MiB")
    cols = ["images", "shards MiB", "decoded MiB", "store peak MiB", "max worker RSS MiB",
            "sum worker RSS MiB", "driver RSS MiB", "s"]
    print("".join(f"{c:>20}" for c in cols))
    for n, r in results.items():
        vals = [n, r["shards_mib"], r["decoded_mib"], r["object_store_peak_mib"], r["worker_rss_peak_mib"],
                r["worker_rss_sum_peak_mib"], r["driver_rss_peak_mib"], r["seconds"]]
        print("".join(f"{v:>20.1f}" if isinstance(v, float) else f"{v:>20}" for v in vals))
    small, big = results[sizes[0]], results[sizes[1]]
    ratio = {k: big[k] / small[k] if small[k] else None
             for k in ("object_store_peak_mib", "worker_rss_peak_mib", "worker_rss_sum_peak_mib")}
    print("10N / N peaks: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items() if v is not None))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest_memory.json").write_text(json.dumps(
        {"sizes": sizes, "results": {str(k): v for k, v in results.items()}, "ratio_10n_over_n": ratio,
         "cpus": args.cpus, "size": args.size, "object_store_memory_mib": 512}, indent=1))
    print(f"wrote {RESULTS / 'ingest_memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
