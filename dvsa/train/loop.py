"""The body of ``train_loop_per_worker`` shared by the alignment model and the captioners.

Each Ray Train worker:

1. rebuilds the config and vocabulary from the loop config, builds the model, and, when Ray
   hands it a checkpoint (a restarted worker group, or a re-run with the same ``train.name``),
   restores model, optimizer, scheduler, step and epoch from it;
2. wraps the model with ``ray.train.torch.prepare_model`` (DDP with >1 worker);
3. per epoch: trains on its shard of ``train`` (bf16 autocast on CUDA), rank 0 validates on the
   whole (capped) ``val`` set, and *every* rank calls ``ray.train.report`` (a barrier); rank 0
   attaches the checkpoint on checkpoint epochs;
4. rank 0 logs train loss every ``train.log_every`` steps and the epoch's metrics into the
   job's MLflow run (created by the driver), and prints one progress line per epoch.

An :class:`Objective` (:mod:`dvsa.train.align`, :mod:`dvsa.train.caption`) supplies the loss of a
batch and the validation pass. Each worker also keeps ``<progress_dir>/rank<R>.json`` (pid, step, epoch)
up to date and appends one line per start to ``attempts.jsonl``: operators (and the fault
tolerance test) see which process is training and where each attempt started.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

# Ray is imported where the worker needs it: the objectives' losses (dvsa.train.align/caption)
# import this module and must load without Ray (benchmarks/gpu_check.py on a GPU machine).
from dvsa.config import Config, TrainConfig, from_dict
from dvsa.inference.device import worker_device
from dvsa.ingest import device_decode_size, iter_eval_batches, iter_train_batches
from dvsa.models.build import build_model
from dvsa.models.checkpoint import load_state, save_checkpoint
from dvsa.models.optim import build_optimizer, update
from dvsa.text import Vocab
from dvsa.tracking import RunLogger
from dvsa.train import common
from dvsa.train.skips import SkipPlan, SkipWatch

log = logging.getLogger("dvsa.train")


@dataclass
class ValidationContext:
    model: torch.nn.Module          # bare module, eval mode
    batches: Iterator[dict]         # device batches, uint8 images (capped at data.max_val_images images)
    cfg: Config
    vocab: Vocab
    device: torch.device
    state: dict                     # per-worker objects kept across epochs (e.g. the METEOR scorer)


@dataclass
class Objective:
    """What a model is trained for (:mod:`dvsa.train.align`, :mod:`dvsa.train.caption`): the
    loss of a batch and the validation pass."""

    name: str
    # (model as wrapped by prepare_model, device batch, cfg) -> scalar loss
    loss: Callable[[torch.nn.Module, dict, Config], torch.Tensor]
    # -> (metrics named "val/...", sample rows for the captions table)
    validate: Callable[[ValidationContext], tuple[dict, list]]


# --------------------------------------------------------------------------- batches


def cap_images(batches: Iterator[dict], max_images: int) -> Iterator[dict]:
    """The first ``max_images`` rows (images) of a stream of batches; 0 = no cap."""
    seen = 0
    for b in batches:
        n = len(next(iter(b.values())))
        if max_images and seen + n > max_images:
            keep = max_images - seen
            if keep > 0:
                yield {k: v[:keep] for k, v in b.items()}
            return
        seen += n
        yield b
        if max_images and seen >= max_images:
            return


# --------------------------------------------------------------------------- progress files


class Progress:
    """``rank<R>.json`` (atomic rewrite) and ``attempts.jsonl`` in a local directory."""

    def __init__(self, directory: Optional[str], rank: int):
        self.dir = Path(directory) if directory else None
        self.rank = rank
        if self.dir is not None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError:  # e.g. a worker on another node without that path
                self.dir = None

    def start(self, step: int, epoch: int, resumed: bool) -> None:
        if self.dir is None:
            return
        rec = {"rank": self.rank, "pid": os.getpid(), "start_step": step, "start_epoch": epoch,
               "resumed": resumed, "time": time.time()}
        with open(self.dir / "attempts.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.update(step, epoch)

    def update(self, step: int, epoch: int, checkpointed_step: Optional[int] = None) -> None:
        if self.dir is None:
            return
        rec = {"rank": self.rank, "pid": os.getpid(), "step": step, "epoch": epoch, "time": time.time()}
        if checkpointed_step is not None:
            rec["checkpointed_step"] = checkpointed_step
        tmp = self.dir / f".rank{self.rank}.json.tmp"
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, self.dir / f"rank{self.rank}.json")


# --------------------------------------------------------------------------- the loop


def _is_checkpoint_epoch(epoch_done: int, cfg: Config, last: bool) -> bool:
    return last or epoch_done % cfg.train.checkpoint_every == 0


def _is_val_epoch(epoch_done: int, cfg: Config, last: bool) -> bool:
    return last or epoch_done % cfg.train.val_every == 0 or _is_checkpoint_epoch(epoch_done, cfg, last)


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a broadcast when the world has more than one worker)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _mean_across_ranks(total: float, count: float, device: torch.device) -> float:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1.0)


@dataclass
class _Trainee:
    """What one worker trains: the model (as ``prepare_model`` wrapped it, and bare), its
    optimizer and schedule, and where training stands."""

    model: torch.nn.Module
    bare: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: int = 0
    epoch: int = 0
    resumed: bool = False
    checkpoint_metrics: dict = field(default_factory=dict)

    def done(self, t: TrainConfig) -> bool:
        return self.epoch >= t.epochs or bool(t.max_steps and self.step >= t.max_steps)


def _build_trainee(cfg: Config, vocab: Vocab, rank: int, total_steps: int) -> _Trainee:
    """The model, optimizer and schedule, restored from the checkpoint Ray hands this worker
    (a restarted worker group, or a re-run with the same ``train.name``) when there is one."""
    import ray.train.torch

    t = cfg.train
    common.seed_everything(t.seed)
    model = build_model(cfg, vocab)
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(d)
        model.load_state_dict(state["model"])
    common.configure_backends(t)
    common.apply_step_switches(model, t)                      # channels-last, torch.compile (in place)
    step = int(state["step"]) if state is not None else 0
    common.seed_everything(t.seed + 1000003 * step + rank)   # data-order/dropout streams differ per rank and resume
    model = ray.train.torch.prepare_model(model)              # to device; DDP when world > 1
    optimizer = build_optimizer(model.parameters(), t, lr=common.scaled_lr(cfg))   # fused/foreach per device
    scheduler = common.build_scheduler(optimizer, t, total_steps)
    trainee = _Trainee(model, common.unwrap(model), optimizer, scheduler)
    if state is not None:
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        trainee.step, trainee.epoch, trainee.resumed = step, int(state["epoch"]), True
        trainee.checkpoint_metrics = dict(state.get("metrics") or {})
    return trainee


@dataclass
class _EpochStats:
    loss_sum: float = 0.0     # sum of per-step losses (read from the device every log window)
    steps: int = 0
    images: int = 0


def _train_epoch(objective: Objective, tr: _Trainee, cfg: Config, shard: Any, device: torch.device,
                 use_amp: bool, logger: Optional[RunLogger], progress: Progress) -> _EpochStats:
    """One pass over this worker's shard of ``train`` (or up to ``train.max_steps``). The loss
    stays on the device and is read once per ``train.log_every`` steps (no host sync per step)."""
    t = cfg.train
    params = [p for p in tr.model.parameters() if p.requires_grad]
    stats = _EpochStats()
    window = torch.zeros((), device=device)
    window_n = 0
    # pinned host batches, non-blocking copies on CUDA; a seeded shuffle buffer per epoch
    for batch in iter_train_batches(shard, cfg.data.batch_size, device, cfg.data.prefetch_batches,
                                    epoch=tr.epoch, seed=t.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                    drop_last=True, jpeg_size=device_decode_size(cfg)):
        with common.autocast(device, use_amp):
            loss = objective.loss(tr.model, batch, cfg)
        update(tr.optimizer, loss, params, t)
        tr.scheduler.step()
        tr.step += 1
        stats.images += len(batch["box_mask"])   # rows = images (also in feature mode, no "images")
        window += loss.detach().float()
        window_n += 1
        stop = bool(t.max_steps and tr.step >= t.max_steps)
        if tr.step % t.log_every == 0 or stop:
            w = float(window) / window_n
            stats.loss_sum += w * window_n
            stats.steps += window_n
            window.zero_()
            window_n = 0
            if logger is not None:
                logger.log_metrics({"train/loss": w, "train/lr": tr.scheduler.get_last_lr()[0]}, tr.step,
                                   flush=False)
        progress.update(tr.step, tr.epoch)
        if stop:
            break
    if window_n:
        stats.loss_sum += float(window)
        stats.steps += window_n
    return stats


def _validate(objective: Objective, tr: _Trainee, cfg: Config, vocab: Vocab, shard: Any, device: torch.device,
              use_amp: bool, state: dict) -> tuple[dict, list]:
    """Rank 0's pass over the whole (capped) ``val`` set: ``(metrics "val/...", sample rows)``."""
    t1 = time.perf_counter()
    tr.bare.eval()
    with torch.no_grad(), common.autocast(device, use_amp):
        vctx = ValidationContext(
            model=tr.bare, cfg=cfg, vocab=vocab, device=device, state=state,
            batches=cap_images(iter_eval_batches(shard, cfg.data.val_batch_size, device, cfg.data.prefetch_batches,
                                                 jpeg_size=device_decode_size(cfg)),
                               cfg.data.max_val_images))
        metrics, samples = objective.validate(vctx)
    metrics["val/time_s"] = time.perf_counter() - t1
    return metrics, samples


def _report(tr: _Trainee, cfg: Config, vocab: Vocab, metrics: dict, rank: int, checkpoint: bool,
            progress: Progress) -> None:
    """``ray.train.report`` (a barrier every rank joins); rank 0 attaches the checkpoint on
    checkpoint epochs."""
    import ray.train

    if rank == 0 and checkpoint:
        with tempfile.TemporaryDirectory(prefix="dvsa-ckpt-") as tmp:
            save_checkpoint(tmp, model=tr.bare, optimizer=tr.optimizer, scheduler=tr.scheduler, step=tr.step,
                            epoch=tr.epoch, vocab=vocab, cfg=cfg, metrics=metrics)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        progress.update(tr.step, tr.epoch, checkpointed_step=tr.step)
    else:
        ray.train.report(metrics if rank == 0 else {"epoch": tr.epoch, "step": tr.step})


def run_worker(objective: Objective, config: dict) -> dict:
    """``train_loop_per_worker`` body. Returns rank 0's final metrics and sample captions."""
    import ray.train

    cfg = from_dict(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    use_amp = t.amp and device.type == "cuda"
    vocab = Vocab.load(config["vocab"])
    tr = _build_trainee(cfg, vocab, rank, config.get("total_steps") or 1)

    progress = Progress(config.get("progress_dir"), rank)
    progress.start(tr.step, tr.epoch, tr.resumed)
    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else None
    name = config.get("train_name", "")
    if logger is not None:
        starts = logger.record_worker_start(tr.step, tr.resumed)
        if starts > 1:
            log.warning("[%s] training workers started %d times in this run (now from step %d)", name, starts,
                        tr.step)
    if rank == 0:
        how = f"resumed from step {tr.step} (epoch {tr.epoch})" if tr.resumed else "from scratch"
        log.info("[%s] %s: %d worker(s) on %s, %s, %s", name, objective.name, world, device.type,
                 "bf16 autocast" if use_amp else "fp32", how)

    skips = SkipWatch(SkipPlan(**config["skips"])) if rank == 0 and config.get("skips") else None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if rank == 0 else None
    val_state: dict = {}
    aborted: Optional[str] = None
    last_metrics: dict = {}
    samples: list = []
    try:
        if tr.resumed and tr.done(t):
            # resumed from the final checkpoint (e.g. the driver died between that checkpoint
            # and the run's end): nothing to train; report its metrics once so that the run
            # (and a Tune trial's scheduler) ends on them rather than on nothing
            last_metrics = tr.checkpoint_metrics
            ray.train.report(last_metrics if rank == 0 else {"epoch": tr.epoch, "step": tr.step})
        while not tr.done(t):
            tr.model.train()
            t0 = time.perf_counter()
            stats = _train_epoch(objective, tr, cfg, train_shard, device, use_amp, logger, progress)
            train_time = time.perf_counter() - t0
            tr.epoch += 1
            last = tr.done(t)
            metrics = {"epoch": tr.epoch, "step": tr.step,
                       "train/epoch_loss": _mean_across_ranks(stats.loss_sum, stats.steps, device),
                       "train/images_per_s": stats.images * world / max(train_time, 1e-9)}
            problems: list[str] = []
            if skips is not None:          # after the all-reduce above: every rank's pass is done
                skipped, problem = skips.pass_done("train")
                metrics.update(skipped)
                problems += [problem] if problem else []
            if rank == 0 and _is_val_epoch(tr.epoch, cfg, last):
                val_metrics, samples = _validate(objective, tr, cfg, vocab, val_shard, device, use_amp, val_state)
                metrics.update(val_metrics)
                if skips is not None:
                    skipped, problem = skips.pass_done("val")
                    metrics.update(skipped)
                    problems += [problem] if problem else []
            if rank == 0:
                last_metrics = dict(metrics)
                if logger is not None:
                    logger.log_metrics(metrics, tr.step, flush=True)
                shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                 if k not in ("epoch", "step") and isinstance(v, (int, float)))
                log.info("[%s] epoch %d/%d step %d %s (%.1f s train)", name, tr.epoch, t.epochs, tr.step, shown,
                         train_time)
            aborted = _from_rank0(problems[0] if problems else None)
            if aborted:                    # too much bad data: every rank stops here, the driver fails the job
                if rank == 0:
                    log.error("[%s] %s", name, aborted)
                break
            _report(tr, cfg, vocab, metrics, rank, _is_checkpoint_epoch(tr.epoch, cfg, last), progress)
    finally:
        if logger is not None:
            logger.flush()
        scorer = val_state.get("scorer")
        if scorer is not None:
            scorer.close()
    return {"step": tr.step, "epoch": tr.epoch, "metrics": last_metrics, "samples": samples,
            "picture": val_state.get("picture"), "aborted": aborted}
