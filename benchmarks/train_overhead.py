"""Training overhead: steps/s of a 1-worker TorchTrainer vs the same loop in plain PyTorch.

Both run the tiny region captioner's training step from dvsa.train.caption (forward, loss,
backward, element-wise clip, Adam) on the same in-memory batches (generated from one seed in
each process), with the same torch thread count. The TorchTrainer variant adds what a dvsa
job adds: ``prepare_model``, ``ray.train.report`` (once per epoch in dvsa; ``--report-every N``
adds one every N steps), and a Ray actor process. Steady-state steps/s are timed after warm-up steps; the fixed cost
(Ray start, worker group start) is reported apart. Rounds alternate plain/Ray to share the
machine's noise; the median round is reported.

    .venv/bin/python benchmarks/train_overhead.py [--steps 60] [--rounds 3]

Prints a table and writes benchmarks/results/train_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def make_cfg(image_size: int, batch: int):
    from dvsa.config import load_config

    root = Path(__file__).resolve().parents[1]
    return load_config(root / "configs" / "tiny.yaml", [f"data.image_size={image_size}", f"data.batch_size={batch}"])


def make_batches(cfg, vocab_size: int, n: int, seed: int = 0) -> list[dict]:
    """Region-captioner batches with the ingest contract's columns and shapes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    B, R, T, S = cfg.data.batch_size, cfg.caption.max_regions_per_image, cfg.data.max_len - 1, cfg.data.image_size
    out = []
    for _ in range(n):
        xy = torch.randint(0, S // 2, (B, R, 2), generator=g).float()
        wh = torch.randint(8, S // 2, (B, R, 2), generator=g).float()
        tokens = torch.randint(4, vocab_size, (B, R, T), generator=g)
        out.append({
            "images": torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=g),
            "boxes": torch.cat([xy, xy + wh], -1),
            "box_mask": torch.ones(B, R, dtype=torch.bool),
            "inputs": torch.cat([torch.ones(B, R, 1, dtype=torch.long), tokens[..., :-1]], -1),
            "targets": tokens,
        })
    return out


class _Vocab:
    def __init__(self, n):
        self.itos = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(n - 4)]

    def __len__(self):
        return len(self.itos)

    def log_frequencies(self):
        return [0.0] * len(self.itos)


def run_steps(model, cfg, batches, steps: int, warmup: int, report=None, report_every: int = 0) -> tuple[float, float]:
    """The dvsa training step, ``steps`` times after ``warmup``; returns steady-state steps/s by
    wall clock and by this process's CPU time (robust to other load on a shared machine)."""
    import torch

    from dvsa.models.optim import build_optimizer, update
    from dvsa.train import common
    from dvsa.train.caption import caption_batch_loss

    device = torch.device("cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, cfg.train)
    t0 = c0 = None
    for i in range(warmup + steps):
        if i == warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        batch = batches[i % len(batches)]
        with common.autocast(device, cfg.train.amp):
            loss = caption_batch_loss(model, batch, cfg)
        update(opt, loss, params, cfg.train)
        if report is not None and report_every and (i + 1) % report_every == 0:
            report({"step": i + 1, "train/loss": float(loss)})
    return steps / (time.perf_counter() - t0), steps / (time.process_time() - c0)


def plain(args) -> tuple[float, float]:
    import torch

    from dvsa.models.build import build_model
    from dvsa.train.common import seed_everything

    torch.set_num_threads(args.threads)
    cfg = make_cfg(args.image_size, args.batch)
    seed_everything(0)
    model = build_model(cfg, _Vocab(args.vocab))
    return run_steps(model, cfg, make_batches(cfg, args.vocab, args.distinct), args.steps, args.warmup)


def ray_loop(config: dict) -> tuple[float, float]:
    import ray.train
    import ray.train.torch
    import torch

    from dvsa.models.build import build_model
    from dvsa.train.common import seed_everything

    torch.set_num_threads(config["threads"])
    cfg = make_cfg(config["image_size"], config["batch"])
    seed_everything(0)
    model = ray.train.torch.prepare_model(build_model(cfg, _Vocab(config["vocab"])))
    batches = make_batches(cfg, config["vocab"], config["distinct"])
    rate = run_steps(model, cfg, batches, config["steps"], config["warmup"], ray.train.report, config["report_every"])
    ray.train.report({"steps_per_s": rate[0]})   # the end-of-epoch report of a dvsa loop
    return rate


def with_ray(args) -> tuple[tuple[float, float], float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    trainer = TorchTrainer(
        ray_loop, train_loop_config=vars(args),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.threads}),
        run_config=RunConfig(name=f"overhead-{time.time_ns()}", storage_path=args.storage))
    result = trainer.fit()
    return tuple(result.return_value), time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--vocab", type=int, default=200)
    p.add_argument("--distinct", type=int, default=8, help="distinct batches cycled through")
    p.add_argument("--threads", type=int, default=1, help="torch threads (= CPUs of the Ray worker)")
    p.add_argument("--report-every", type=int, default=0,
                   help="ray.train.report every N steps (0: once at the end, as a dvsa epoch does)")
    args = p.parse_args()

    import ray

    tmp = tempfile.mkdtemp(prefix="dvsa-bo-", dir="/tmp")
    args.storage = os.path.join(tmp, "results")
    t0 = time.perf_counter()
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, _temp_dir=os.path.join(tmp, "ray"),
             log_to_driver=False, configure_logging=False)
    ray_start = time.perf_counter() - t0
    rows = []
    try:
        for r in range(args.rounds):
            (pl, plc) = plain(args)
            (ry, ryc), wall = with_ray(args)
            rows.append({"round": r, "plain_steps_per_s": pl, "ray_steps_per_s": ry, "ratio": ry / pl,
                         "plain_steps_per_cpu_s": plc, "ray_steps_per_cpu_s": ryc, "cpu_ratio": ryc / plc,
                         "ray_fit_wall_s": wall})
            print(f"round {r}: wall-clock steps/s plain {pl:.2f} vs TorchTrainer {ry:.2f} (ratio {ry / pl:.3f}); "
                  f"per CPU-second {plc:.2f} vs {ryc:.2f} (ratio {ryc / plc:.3f}); fit() wall {wall:.1f} s",
                  flush=True)
    finally:
        ray.shutdown()
    med = statistics.median(r["ratio"] for r in rows)
    cpu_med = statistics.median(r["cpu_ratio"] for r in rows)
    summary = {
        "benchmark": "train_overhead",
        "setup": {k: v for k, v in vars(args).items() if k != "storage"},
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        "rounds": rows,
        "plain_steps_per_s_median": statistics.median(r["plain_steps_per_s"] for r in rows),
        "ray_steps_per_s_median": statistics.median(r["ray_steps_per_s"] for r in rows),
        "ratio_median": med,
        "plain_steps_per_cpu_s_median": statistics.median(r["plain_steps_per_cpu_s"] for r in rows),
        "ray_steps_per_cpu_s_median": statistics.median(r["ray_steps_per_cpu_s"] for r in rows),
        "cpu_ratio_median": cpu_med,
        "ray_init_s": ray_start,
        "fit_wall_s_median": statistics.median(r["ray_fit_wall_s"] for r in rows),
        "target_ratio": 0.95,
    }
    print()
    print(f"{'variant':<28}{'steps/s (wall)':>16}{'steps/CPU-s':>14}")
    print(f"{'plain PyTorch':<28}{summary['plain_steps_per_s_median']:>16.2f}"
          f"{summary['plain_steps_per_cpu_s_median']:>14.2f}")
    print(f"{'TorchTrainer, 1 worker':<28}{summary['ray_steps_per_s_median']:>16.2f}"
          f"{summary['ray_steps_per_cpu_s_median']:>14.2f}")
    print(f"{'ratio (target >= 0.95)':<28}{med:>16.3f}{cpu_med:>14.3f}   (median of per-round ratios)")
    print(f"fixed costs: ray.init {ray_start:.1f} s, fit() wall {summary['fit_wall_s_median']:.1f} s for "
          f"{args.warmup + args.steps} steps")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_overhead.json").write_text(json.dumps(summary, indent=2))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
