"""GPU train step: each switch of ``train.*`` on and off, the largest batch, the alignment model,
and CPU- vs GPU-decoded feeding, on one GPU in a few minutes.

Needs only torch, torchvision, numpy, PIL and pyyaml (the lent GPU machine has no Ray, MLflow or
Java): batches are built by the ingest's own :class:`dvsa.ingest.builder.BatchBuilder` from
benchmark shards (640x480 photo-like JPEGs, 20 regions each), and every step is the train loop's
(loss of :mod:`dvsa.train.caption` / :mod:`dvsa.train.align`, gradient clipping, optimizer from
``build_optimizer``, bf16 autocast, switches applied by ``dvsa.train.common``). Stages, each
recorded with its outcome so that one failure does not hide the rest:

1. ``steps``: the region captioner (resnet50, 224 px, 20 regions, bf16, batch 128, Adam) on
   in-memory pinned batches: ``plain`` (every switch off: for-loop Adam, NCHW, eager, no cuDNN
   autotuning, occupied rows selected), each eager switch alone (``static_shapes``: every
   padded region slot computed and masked, no host read per step), and ``eager_all``;
   images/s, ms/step, peak GPU memory and the first step's seconds (torch.compile's cost, in
   stage 5).
2. ``largest_batch``: batch 256, 512, 1024 with the eager switches on, until one does not fit,
   with the learning rate the linear scaling rule gives (``train.lr_scale_batch=128``).
3. ``align``: the alignment model's step (resnet50, 20 regions, BRNN, eq. 8/9), plain and with
   the eager switches.
4. ``feeding``: the eager-switch step fed from in-memory batches, from DataLoader workers that
   decode on the CPU (PIL reduced-size, as Ray Data does), and from workers that only parse while
   the GPU decodes (``data.jpeg_decoder=gpu``: ``decode_jpeg_batch`` on ``cuda``); plus each
   feeder alone (no step).
5. ``compile``: ``train.compile=cnn|model``, alone and with the eager switches, for the
   captioner, and every switch for the alignment model (last: each arm pays a compile).

Arms still waiting when ``--budget-s`` is spent are recorded as skipped. ``--smoke`` runs every
stage on the CPU at toy size (tiny CNN, 64 px, batch 4, fp32, no compile arms) in seconds, so
that tests check the script. On the device machine:
``GPU_CHECK_SCRIPT=benchmarks/gpu_step.py bash benchmarks/gpu_check.sh`` (results in
``$OUT/gpu_step.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from gpu_check import _stage, environment  # noqa: E402  (benchmarks/ is on sys.path)
from ingest import make_bench_shards  # noqa: E402

#: the switches each step arm turns on (everything else is off: the plain path)
OFF = {"train.channels_last": False, "train.compile": "none", "train.optimizer_impl": "for_loop",
       "train.cudnn_benchmark": False, "train.static_shapes": False}
EAGER = {"train.channels_last": True, "train.optimizer_impl": "fused", "train.cudnn_benchmark": True,
         "train.static_shapes": True}
STEP_ARMS = {
    "plain": {},
    "channels_last": {"train.channels_last": True},
    "cudnn_benchmark": {"train.cudnn_benchmark": True},
    "foreach_adam": {"train.optimizer_impl": "foreach"},
    "fused_adam": {"train.optimizer_impl": "fused"},
    "static_shapes": {"train.static_shapes": True},
    "eager_all": EAGER,
}
#: torch.compile arms (stage ``compile``, run last: each pays a compile of up to a minute or two)
COMPILE_ARMS = {
    "compile_cnn": {"train.compile": "cnn"},
    "compile_model": {"train.compile": "model"},
    "all": {**EAGER, "train.compile": "cnn"},
    "all_compile_model": {**EAGER, "train.compile": "model"},
}


@dataclass
class Plan:
    """Sizes of one run: the GPU's, or the CPU smoke test's."""

    device: str
    amp: bool
    config: str
    overrides: list[str]
    images: int
    width: int
    height: int
    warmup: int
    steps: int
    batch: int
    larger_batches: tuple[int, ...]
    loader_workers: int
    compile_arms: bool

    @classmethod
    def gpu(cls) -> "Plan":
        return cls("cuda", True, "configs/vg.yaml",
                   ["model.backbone=resnet50", "model.weights=null", "data.image_size=224"],
                   images=1024, width=640, height=480, warmup=5, steps=25, batch=128,
                   larger_batches=(256, 512, 1024), loader_workers=min(12, max(1, (os.cpu_count() or 2) - 2)),
                   compile_arms=True)

    @classmethod
    def smoke(cls) -> "Plan":
        return cls("cpu", False, "configs/tiny.yaml", ["data.image_size=32", "model.roi_size=2"], images=8,
                   width=96, height=72, warmup=0, steps=1, batch=4, larger_batches=(8,), loader_workers=0,
                   compile_arms=False)


# --------------------------------------------------------------------------- data


def _cfg(plan: Plan, task: str, batch: int, switches: dict):
    from dvsa.config import load_config

    base = [f"task={task}", "caption.mode=region", "caption.max_regions_per_image=20", "data.max_regions=20",
            f"data.batch_size={batch}", "train.optimizer=adam", "train.num_workers=1",
            "train.lr_scale_batch=0", *plan.overrides]
    cfg = load_config(REPO / plan.config, base)
    return cfg.replace(**{**OFF, **switches})


def _raw_samples(root: str) -> list[tuple[str, bytes, bytes]]:
    from dvsa.data.shards import iter_samples

    return [(key, jpg, json.dumps(meta).encode()) for key, jpg, meta in iter_samples(root, "train")]


def _builder(cfg, vocab, decoder: str):
    from dataclasses import replace

    from dvsa.ingest.builder import BatchBuilder
    from dvsa.ingest.dataset import ingest_spec

    layout = "align" if cfg.task == "align" else "caption_region"
    return BatchBuilder(replace(ingest_spec(layout, cfg, randomize=False), decoder=decoder), vocab)


def _raw_batch(samples) -> dict:
    import numpy as np

    cols: dict = {"__key__": np.empty(len(samples), object), "jpg": np.empty(len(samples), object),
                  "json": np.empty(len(samples), object)}
    for i, (key, jpg, meta) in enumerate(samples):
        cols["__key__"][i], cols["jpg"][i], cols["json"][i] = key, jpg, meta
    return cols


def _tensors(columns: dict) -> dict:
    """Builder columns -> torch tensors (``jpeg`` stays a list of bytes)."""
    import torch

    return {k: (list(v) if k == "jpeg" else torch.from_numpy(v)) for k, v in columns.items()}


def _memory_batches(cfg, vocab, samples, batch: int, device) -> list[dict]:
    """Decoded (PIL) batches, pinned on CUDA: what ``iter_train_batches`` hands the loop."""
    builder = _builder(cfg, vocab, "pil")
    out = []
    for i in range(0, len(samples) - batch + 1, batch):
        t = _tensors(builder(_raw_batch(samples[i:i + batch])))
        out.append({k: (v.pin_memory() if device.type == "cuda" else v) for k, v in t.items()})
    if not out:
        raise RuntimeError(f"{len(samples)} samples make no batch of {batch}")
    return out


# --------------------------------------------------------------------------- one step, timed


def _loss_fn(task: str) -> Callable:
    if task == "align":
        from dvsa.train.align import align_batch_loss

        return align_batch_loss
    from dvsa.train.caption import caption_batch_loss

    return caption_batch_loss


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(cfg, vocab, batches: Iterator[dict], device, amp: bool, warmup: int, steps: int,
             decode_size: int = 0) -> dict:
    """``warmup`` + ``steps`` train steps as the loop runs them (switches applied, no host read
    per step); the timed steps are clocked together, between two device syncs."""
    import torch

    from dvsa.ingest.decode import decode_jpeg_batch
    from dvsa.models.build import build_model
    from dvsa.models.optim import build_optimizer, update
    from dvsa.train import common

    common.seed_everything(cfg.train.seed)
    common.configure_backends(cfg.train)
    model = common.apply_step_switches(build_model(cfg, vocab).to(device), cfg.train)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.train, lr=common.scaled_lr(cfg))
    loss_of = _loss_fn(cfg.task)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses = torch.zeros(warmup + steps, device=device)
    first_s = 0.0
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        host = next(batches)
        jpegs = host.get("jpeg")
        batch = {k: v.to(device, non_blocking=True) for k, v in host.items() if k != "jpeg"}
        if jpegs is not None:
            batch["images"] = decode_jpeg_batch(jpegs, decode_size, device)
        with common.autocast(device, amp):
            loss = loss_of(model, batch, cfg)
        update(optimizer, loss, params, cfg.train)
        losses[i] = loss.detach()
        if i == 0:
            _sync(device)
            first_s = time.perf_counter() - t0
    _sync(device)
    total = time.perf_counter() - t0
    values = losses.tolist()
    if not all(abs(v) < float("inf") for v in values):
        raise RuntimeError(f"non-finite loss: {values}")
    out = {"batch_size": cfg.data.batch_size, "steps": steps, "step_ms": round(1000 * total / steps, 2),
           "images_per_s": round(cfg.data.batch_size * steps / total, 1), "first_step_s": round(first_s, 2),
           "lr": common.scaled_lr(cfg), "loss_first": round(values[0], 4), "loss_last": round(values[-1], 4)}
    if device.type == "cuda":
        out["peak_gpu_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def _cycle(items: list) -> Iterator:
    while True:
        yield from items


class _Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def _arms(names: list[str], run: Callable[[str], dict], budget: _Budget, need_s: float) -> dict:
    out: dict = {}
    for name in names:
        if budget.left() < need_s:
            out[name] = {"skipped": f"time budget (--budget-s) spent: {budget.left():.0f} s left"}
            continue
        try:
            out[name] = run(name)
        except Exception as e:  # recorded; the next arm still runs
            out[name] = {"error": f"{type(e).__name__}: {e}"[-1000:]}
            if "out of memory" in str(e).lower():
                _free_cuda()
        print(f"   {name}: {json.dumps(out[name])[:300]}", flush=True)
    return out


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _speedups(arms: dict, ref: str = "plain") -> dict:
    base = arms.get(ref, {}).get("images_per_s")
    return {k: round(v["images_per_s"] / base, 3) for k, v in arms.items() if base and "images_per_s" in v}


# --------------------------------------------------------------------------- stages


def stage_steps(plan: Plan, vocab, samples, budget: _Budget, results: dict) -> dict:
    """The region captioner's step, plain and with each eager switch (in-memory batches)."""
    import torch

    device = torch.device(plan.device)
    cfg = _cfg(plan, "caption", plan.batch, {})
    batches = _memory_batches(cfg, vocab, samples, plan.batch, device)

    def run(name: str) -> dict:
        c = _cfg(plan, "caption", plan.batch, STEP_ARMS[name])
        return _measure(c, vocab, _cycle(batches), device, plan.amp, plan.warmup, plan.steps)

    arms = _arms(list(STEP_ARMS), run, budget, need_s=10)
    return {"model": "region captioner", "backbone": cfg.model.backbone, "image_size": cfg.data.image_size,
            "regions_per_image": cfg.caption.max_regions_per_image, "amp_bf16": plan.amp,
            "arms": arms, "speedup_vs_plain": _speedups(arms)}


def stage_compile(plan: Plan, vocab, samples, budget: _Budget, results: dict) -> dict:
    """torch.compile of the CNN or the whole model, alone and with the eager switches (captioner),
    and the alignment model with every switch."""
    import torch

    if not plan.compile_arms:
        return {"skipped": "smoke run: compile arms run on the GPU (tests/test_gpu_step.py checks "
                           "torch.compile on the CPU)"}
    device = torch.device(plan.device)
    batches = _memory_batches(_cfg(plan, "caption", plan.batch, {}), vocab, samples, plan.batch, device)

    def run(name: str) -> dict:
        c = _cfg(plan, "caption", plan.batch, COMPILE_ARMS[name])
        return _measure(c, vocab, _cycle(batches), device, plan.amp, plan.warmup, plan.steps)

    arms = _arms(list(COMPILE_ARMS), run, budget, need_s=90)
    plain = results.get("steps", {}).get("arms", {}).get("plain", {})
    align = _align_arms(plan, vocab, samples, budget, {"all": {**EAGER, "train.compile": "cnn"}}, need_s=90)
    align_plain = results.get("align", {}).get("arms", {}).get("plain", {})
    return {"arms": arms, "speedup_vs_plain": _speedups({"plain": plain, **arms}),
            "align_arms": align, "align_speedup_vs_plain": _speedups({"plain": align_plain, **align})}


def stage_largest_batch(plan: Plan, vocab, samples, budget: _Budget, results: dict) -> dict:
    import torch

    device = torch.device(plan.device)
    out: dict = {"switches": EAGER, "lr_scale_batch": plan.batch, "batches": {}}
    for b in plan.larger_batches:
        if len(samples) < b:
            out["batches"][str(b)] = {"skipped": f"only {len(samples)} benchmark images"}
            continue

        def run(name: str) -> dict:
            cfg = _cfg(plan, "caption", int(name), {**EAGER, "train.lr_scale_batch": plan.batch})
            batches = _memory_batches(cfg, vocab, samples, int(name), device)
            return _measure(cfg, vocab, _cycle(batches), device, plan.amp, 2, max(2, plan.steps // 3))

        res = _arms([str(b)], run, budget, need_s=15)
        out["batches"].update(res)
        _free_cuda()
        if "error" in res[str(b)]:
            break
    fits = [int(k) for k, v in out["batches"].items() if "images_per_s" in v]
    out["largest_that_fits"] = max(fits, default=None)
    return out


def _align_arms(plan: Plan, vocab, samples, budget: _Budget, arms: dict, need_s: float) -> dict:
    import torch

    device = torch.device(plan.device)
    batches = _memory_batches(_cfg(plan, "align", plan.batch, {}), vocab, samples, plan.batch, device)

    def run(name: str) -> dict:
        c = _cfg(plan, "align", plan.batch, arms[name])
        return _measure(c, vocab, _cycle(batches), device, plan.amp, plan.warmup, plan.steps)

    return _arms(list(arms), run, budget, need_s=need_s)


def stage_align(plan: Plan, vocab, samples, budget: _Budget, results: dict) -> dict:
    """The alignment model's step (whole image + 19 boxes, BRNN, eq. 8, eq. 9), plain and eager."""
    cfg = _cfg(plan, "align", plan.batch, {})
    res = _align_arms(plan, vocab, samples, budget, {"plain": {}, "eager_all": EAGER}, need_s=10)
    return {"model": "alignment (BRNN, eq. 8, eq. 9)", "backbone": cfg.model.backbone,
            "regions": cfg.data.max_regions, "arms": res, "speedup_vs_plain": _speedups(res)}


class _RawBatches:
    """Map-style dataset for a DataLoader: batch ``i`` = the builder's columns of raw samples
    ``[i*B, (i+1)*B)`` (cycling over the benchmark set), as torch tensors."""

    def __init__(self, builder, samples, batch: int, count: int):
        self.builder, self.samples, self.batch, self.count = builder, samples, batch, count
        self.per_pass = len(samples) // batch

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        j = (i % self.per_pass) * self.batch
        return _tensors(self.builder(_raw_batch(self.samples[j:j + self.batch])))


def _loader(builder, samples, batch: int, count: int, workers: int, pin: bool):
    import torch

    return torch.utils.data.DataLoader(_RawBatches(builder, samples, batch, count), batch_size=None,
                                       shuffle=False, num_workers=workers, pin_memory=pin,
                                       prefetch_factor=4 if workers else None)


def _feeder_only(loader, decode_size: int, device) -> dict:
    """The feeder alone: batches to the device (decoded there for the gpu decoder), no step."""
    from dvsa.ingest.decode import decode_jpeg_batch

    n, t0 = 0, time.perf_counter()
    for host in loader:
        jpegs = host.pop("jpeg", None)
        batch = {k: v.to(device, non_blocking=True) for k, v in host.items()}
        if jpegs is not None:
            batch["images"] = decode_jpeg_batch(jpegs, decode_size, device)
        n += len(batch["images"])
    _sync(device)
    dt = time.perf_counter() - t0
    return {"images": n, "images_per_s": round(n / dt, 1)}


def stage_feeding(plan: Plan, vocab, samples, budget: _Budget, results: dict) -> dict:
    import torch

    device = torch.device(plan.device)
    cfg = _cfg(plan, "caption", plan.batch, EAGER)
    count = plan.warmup + plan.steps
    size = cfg.data.image_size
    cuda = device.type == "cuda"

    def run(name: str) -> dict:
        if name == "in_memory":
            batches = _memory_batches(cfg, vocab, samples, plan.batch, device)
            return _measure(cfg, vocab, _cycle(batches), device, plan.amp, plan.warmup, plan.steps)
        decoder = "gpu" if name.startswith("gpu") else "pil"
        loader = _loader(_builder(cfg, vocab, decoder), samples, plan.batch, count, plan.loader_workers, cuda)
        if name.endswith("_only"):
            return _feeder_only(loader, size, device)
        return _measure(cfg, vocab, iter(loader), device, plan.amp, plan.warmup, plan.steps, decode_size=size)

    names = ["in_memory", "cpu_decode_step", "gpu_decode_step", "cpu_decode_only", "gpu_decode_only"]
    res = _arms(names, run, budget, need_s=10)
    return {"switches": EAGER, "loader_workers": plan.loader_workers, "cpu_decoder": "pil (reduced-size draft)",
            "arms": res, "vs_in_memory": _speedups(res, ref="in_memory")}


# --------------------------------------------------------------------------- main


def _default_out(smoke: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_step.json"
    return HERE / "results" / ("gpu_step_smoke.json" if smoke else "gpu_step.json")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="every stage on the CPU at toy size (seconds)")
    p.add_argument("--budget-s", type=float, default=400.0, help="time for all arms; later ones are skipped")
    p.add_argument("--stages", default="steps,largest_batch,align,feeding,compile")
    p.add_argument("--out", default=None, help="results JSON (default $OUT/gpu_step.json or benchmarks/results/)")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else _default_out(a.smoke)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = Plan.smoke() if a.smoke else Plan.gpu()
    if a.smoke:
        import torch

        torch.set_num_threads(1)     # toy sizes: threads only contend
    budget = _Budget(a.budget_s)
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv[1:], "plan": plan.__dict__}
    env = _stage(results, "environment", environment, a.smoke)
    if env["ok"]:
        from dvsa.data.shards import load_vocab

        work = tempfile.mkdtemp(prefix="dvsa-gpu-step-")
        shards = _stage(results, "shards", lambda: {"root": make_bench_shards(
            os.path.join(work, "shards"), plan.images, plan.width, plan.height, regions=20)})
        if shards["ok"]:
            root = shards["root"]
            vocab, samples = load_vocab(root), _raw_samples(root)
            stages = {"steps": stage_steps, "largest_batch": stage_largest_batch, "align": stage_align,
                      "feeding": stage_feeding, "compile": stage_compile}
            for name in a.stages.split(","):
                _stage(results, name, stages[name], plan, vocab, samples, budget, results)
                out.write_text(json.dumps(results, indent=2))   # after each stage: a run cut short keeps them
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
