"""GPU check: one short region-captioner training on a lent GPU, and an NCCL check.

Run through ``benchmarks/gpu_check.sh`` (which installs the project on a bare machine). Stages,
each recorded in the results JSON with its outcome, so one failure does not hide the rest:

1. ``dvsa synth`` (small) and ``dvsa prepare vg --no-ray``: real shards, as a user makes them.
2. ``train``: the region captioner of ``configs/vg.yaml`` (resnet50 by default, no pretrained
   weights: the machine is offline) trained on batches built from those shards by the ingest's
   own :class:`dvsa.ingest.builder.BatchBuilder`, with the train loop's own loss, optimizer,
   gradient clipping and bf16 autocast. Measured twice in one run, bf16 autocast and fp32 (the
   baseline a user would otherwise get), each: step time (mean, p50), images/s, captions/s
   and peak GPU memory (``torch.cuda.max_memory_allocated``).
3. ``nccl``: ``torch.distributed`` with the NCCL backend, one rank: an all_reduce with a known
   answer, then the time of an all_reduce of 256 MiB (one rank: NCCL's local path); and, when Ray
   is importable, the same through a 1-worker ``TorchTrainer(use_gpu=True)`` (NCCL backend) as the jobs use it.
4. ``ray_job``: when ray, mlflow, webdataset, pycocoevalcap and Java are all present, the real
   ``python -m jobs.train_caption`` with ``train.use_gpu=true``; its MLflow run's
   ``train/images_per_s`` and final metrics. Skipped, with the reason, otherwise.

``--cpu`` (or GPU_CHECK_CPU=1) runs the same stages on the CPU with ``configs/tiny.yaml``, fp32
and gloo, so the script itself can be checked on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"exit {res.returncode}: {(res.stdout + res.stderr)[-3000:]}")
    return res


def _stage(results: dict, name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
        results[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 2), **(out or {})}
    except Exception as e:  # recorded; the next stage still runs
        traceback.print_exc()
        results[name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 2),
                         "error": f"{type(e).__name__}: {e}"[-2000:]}
    print(f"== {name}: {json.dumps(results[name])[:600]}", flush=True)
    return results[name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --------------------------------------------------------------------------- stages


def environment(cpu: bool) -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available(), "mode": "cpu" if cpu else "gpu",
           "packages": {m: _importable(m) for m in ("ijson", "ray", "mlflow", "webdataset", "pycocoevalcap")},
           "java": shutil.which("java") is not None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    if not cpu and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible to torch (use --cpu / GPU_CHECK_CPU=1 to check on a CPU)")
    return out


def make_shards(work: Path, images: int, image_size: int) -> dict:
    world, shards = work / "world", work / "vg"
    py = sys.executable
    _run([py, "-m", "dvsa.cli", "synth", "--out", str(world), "--images", str(images),
          "--image-size", str(image_size)], timeout=600)
    _run([py, "-m", "dvsa.cli", "prepare", "vg", "--root", str(world / "vg"), "--out", str(shards),
          "--min-count", "1", "--no-ray", "--quiet"], timeout=600)
    from dvsa.data.manifest import Manifest

    splits = {k: c.images for k, c in Manifest.read(str(shards)).splits.items()}
    return {"shards": str(shards), "images": splits}


def _host_batches(cfg, shards: str, vocab, batch_size: int) -> list[dict]:
    """The train split as fixed-shape batches, built by the ingest's own BatchBuilder."""
    import numpy as np

    from dvsa.data.shards import iter_samples
    from dvsa.ingest.builder import BatchBuilder
    from dvsa.ingest.dataset import ingest_spec, resolve_layout

    builder = BatchBuilder(ingest_spec(resolve_layout("caption", cfg), cfg, randomize=True), vocab)
    keys, jpgs, metas = [], [], []
    for key, jpg, meta in iter_samples(shards, "train"):
        keys.append(key)
        jpgs.append(jpg)
        metas.append(json.dumps(meta).encode())
    cols = builder({"__key__": np.array(keys), "jpg": jpgs, "json": metas})
    n = len(cols["images"])
    if n < batch_size:
        raise RuntimeError(f"only {n} train images for batch size {batch_size}: synthesize more")
    return [{k: v[i:i + batch_size] for k, v in cols.items() if isinstance(v, np.ndarray)
             and v.dtype != object} for i in range(0, n - batch_size + 1, batch_size)]


def _measure(cfg, vocab, host_batches: list[dict], device, amp: bool, warmup: int, steps: int) -> dict:
    import torch

    from dvsa.models.build import build_model
    from dvsa.models.optim import build_optimizer, update
    from dvsa.train import common
    from dvsa.train.caption import caption_batch_loss

    common.seed_everything(cfg.train.seed)
    model = build_model(cfg, vocab).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.train)
    cuda = device.type == "cuda"
    # pinned host tensors, non-blocking copies: as the train loop gets them from Ray Data
    pinned = [{k: (torch.from_numpy(v).pin_memory() if cuda else torch.from_numpy(v)) for k, v in b.items()}
              for b in host_batches]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, captions = [], [], 0
    for i in range(warmup + steps):
        hb = pinned[i % len(pinned)]
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in hb.items()}
        with common.autocast(device, amp):
            loss = caption_batch_loss(model, batch, cfg)
        update(optimizer, loss, params, cfg.train)
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
            captions += int(batch["box_mask"].sum())
        losses.append(float(loss.detach()))
    if not all(map(lambda x: x == x and abs(x) != float("inf"), losses)):
        raise RuntimeError(f"non-finite loss: {losses}")
    batch_size = len(host_batches[0]["images"])
    total = sum(times)
    out = {"amp_bf16": amp, "steps": steps, "batch_size": batch_size,
           "step_ms_mean": round(1000 * total / steps, 2),
           "step_ms_p50": round(1000 * statistics.median(times), 2),
           "images_per_s": round(batch_size * steps / total, 1),
           "captions_per_s": round(captions / total, 1),
           "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
           "parameters": sum(p.numel() for p in params)}
    if cuda:
        out["peak_gpu_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    del model, optimizer, pinned
    return out


def train(cpu: bool, shards: str, overrides: list[str], warmup: int, steps: int) -> dict:
    import torch

    from dvsa.config import load_config
    from dvsa.data.shards import load_vocab

    config = REPO / ("configs/tiny.yaml" if cpu else "configs/vg.yaml")
    cfg = load_config(config, ["task=caption", "caption.mode=region", f"data.shards={shards}", *overrides])
    vocab = load_vocab(shards)
    device = torch.device("cpu" if cpu else "cuda:0")
    batches = _host_batches(cfg, shards, vocab, cfg.data.batch_size)
    runs = {}
    for amp in ([False] if cpu else [True, False]):
        runs["bf16" if amp else "fp32"] = _measure(cfg, vocab, batches, device, amp, warmup, steps)
    out = {"config": str(config.relative_to(REPO)), "overrides": overrides,
           "backbone": cfg.model.backbone, "image_size": cfg.data.image_size,
           "regions_per_image": cfg.caption.max_regions_per_image, "runs": runs}
    if "bf16" in runs:
        out["bf16_speedup_vs_fp32"] = round(runs["fp32"]["step_ms_mean"] / runs["bf16"]["step_ms_mean"], 2)
    return out


def _allreduce_check(backend: str, device) -> dict:
    """all_reduce on this rank's group: a known answer, then the time of 256 MiB (fp32)."""
    import torch
    import torch.distributed as dist

    x = torch.arange(4, dtype=torch.float32, device=device) + 1.0
    dist.all_reduce(x)                               # one rank: the sum is the tensor itself
    assert x.tolist() == [1.0, 2.0, 3.0, 4.0], x.tolist()
    big = torch.ones(64 * 2**20, dtype=torch.float32, device=device)
    dist.all_reduce(big)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        dist.all_reduce(big)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / reps
    return {"backend": dist.get_backend(), "world_size": dist.get_world_size(),
            "allreduce_256mib_ms": round(1000 * dt, 3)}


def nccl(cpu: bool) -> dict:
    import torch
    import torch.distributed as dist

    backend = "gloo" if cpu else "nccl"
    device = torch.device("cpu" if cpu else "cuda:0")
    if not cpu:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        out = {"torch_distributed": _allreduce_check(backend, device)}
    finally:
        dist.destroy_process_group()
    if _importable("ray"):
        out["ray_train"] = _ray_train_allreduce(cpu)
    else:
        out["ray_train"] = {"skipped": "ray is not installed here"}
    return out


def _ray_train_allreduce(cpu: bool) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(_config):
        import ray.train.torch as rt

        return _allreduce_check("gloo" if cpu else "nccl", rt.get_device())

    tmp = tempfile.mkdtemp(prefix="dvsa-gpuchk-", dir="/tmp")
    ray.init(num_cpus=2, num_gpus=0 if cpu else 1, include_dashboard=False, _temp_dir=tmp,
             log_to_driver=True, configure_logging=False)
    try:
        trainer = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, use_gpu=not cpu),
                               torch_config=TorchConfig(backend="gloo" if cpu else "nccl"),
                               run_config=RunConfig(name="gpu-check-nccl", storage_path=f"{tmp}/results"))
        result = trainer.fit()
        return dict(result.return_value)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def ray_job(cpu: bool, work: Path, shards: str, overrides: list[str], max_steps: int) -> dict:
    missing = [m for m in ("ray", "mlflow", "webdataset", "pycocoevalcap") if not _importable(m)]
    if shutil.which("java") is None:
        missing.append("java")
    if missing:
        return {"skipped": f"not installed here: {', '.join(missing)}"}
    import mlflow

    db = work / "mlflow.db"
    config = "configs/tiny.yaml" if cpu else "configs/vg.yaml"
    cmd = [sys.executable, "-m", "jobs.train_caption", "--config", config, "caption.mode=region",
           f"data.shards={shards}", f"out={work / 'job'}", f"train.storage_path={work / 'ray_results'}",
           "train.name=gpu-check", "train.epochs=1", f"train.max_steps={max_steps}", "train.num_workers=1",
           f"train.use_gpu={'false' if cpu else 'true'}", f"mlflow.tracking_uri=sqlite:///{db}",
           "mlflow.experiment=gpu-check", *overrides]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    res = _run(cmd, timeout=900, env=env)
    wall = time.perf_counter() - t0
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["gpu-check"], output_format="list")
    if not runs:
        raise RuntimeError("the job left no MLflow run:\n" + res.stdout[-2000:])
    run = runs[0]
    keep = ("train/images_per_s", "train/epoch_loss", "val/loss", "val/METEOR", "step")
    return {"wall_s": round(wall, 1), "status": run.info.status,
            "metrics": {k: v for k, v in run.data.metrics.items() if k in keep}}


# --------------------------------------------------------------------------- main


def _table(results: dict) -> str:
    rows = [("stage", "ok", "s", "notes")]
    for name in ("environment", "shards", "train", "nccl", "ray_job"):
        r = results.get(name, {})
        note = r.get("error") or r.get("skipped") or ""
        rows.append((name, str(r.get("ok")), str(r.get("seconds", "")), note[:70]))
    train = results.get("train", {})
    for mode, m in (train.get("runs") or {}).items():
        rows.append((f"train {mode}", "", "", f"{m['step_ms_mean']} ms/step, {m['images_per_s']} img/s, "
                     f"{m['captions_per_s']} capt/s, peak {m.get('peak_gpu_mem_mib', '-')} MiB"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", default=os.environ.get("GPU_CHECK_CPU") == "1",
                   help="run on the CPU (configs/tiny.yaml, fp32, gloo): checks the script itself")
    p.add_argument("--images", type=int, default=None, help="synthetic images (default 600 GPU, 60 CPU)")
    p.add_argument("--image-size", type=int, default=None, help="synthetic image width (default 256 / 64)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per precision (default 30 / 3)")
    p.add_argument("--job-steps", type=int, default=None, help="max_steps of the Ray job stage")
    p.add_argument("--work", default=None, help="scratch dir (default a new /tmp dir)")
    p.add_argument("--out", default=None, help="results JSON (default $OUT/gpu_check.json or "
                   "benchmarks/results/gpu_check[_cpu].json)")
    p.add_argument("overrides", nargs="*", help="config overrides for the training stages, key=value")
    a = p.parse_args(argv)
    cpu = a.cpu
    images = a.images or (60 if cpu else 600)
    size = a.image_size or (64 if cpu else 256)
    warmup = a.warmup if a.warmup is not None else (1 if cpu else 5)
    steps = a.steps or (3 if cpu else 30)
    job_steps = a.job_steps or (4 if cpu else 40)
    # GPU defaults: vg.yaml's region captioner at a size that trains from scratch offline
    overrides = a.overrides or ([] if cpu else ["model.backbone=resnet50", "model.weights=null",
                                                "data.batch_size=32", "data.jpeg_decoder=pil"])
    work = Path(a.work or tempfile.mkdtemp(prefix="dvsa-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                                     else REPO / "benchmarks" / "results" / f"gpu_check{'_cpu' if cpu else ''}.json")
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:]}
    env = _stage(results, "environment", environment, cpu)
    if env["ok"]:
        sh = _stage(results, "shards", make_shards, work, images, size)
        if sh["ok"]:
            _stage(results, "train", train, cpu, sh["shards"], overrides, warmup, steps)
        _stage(results, "nccl", nccl, cpu)
        if sh["ok"]:
            _stage(results, "ray_job", ray_job, cpu, work, sh["shards"], overrides, job_steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(_table(results))
    print(f"results: {out}")
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
