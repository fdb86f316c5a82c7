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

A task (:mod:`dvsa.train.align`, :mod:`dvsa.train.caption`) supplies the loss of a batch and
the validation pass. Each worker also keeps ``<progress_dir>/rank<R>.json`` (pid, step, epoch)
up to date and appends one line per start to ``attempts.jsonl``: operators (and the fault
tolerance test) see which process is training and where each attempt started.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from dvsa.config import Config, from_dict
from dvsa.models.optim import build_optimizer, clip_gradients
from dvsa.train import common
from dvsa.train.checkpoints import load_state, save_checkpoint

log = logging.getLogger("dvsa.train")


@dataclass
class ValidationContext:
    model: torch.nn.Module          # bare module, eval mode
    batches: Iterator[dict]         # device batches, uint8 images (capped at data.max_val_images images)
    cfg: Config
    vocab: Any
    device: torch.device
    state: dict                     # per-worker objects kept across epochs (e.g. the METEOR scorer)


@dataclass
class Task:
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


def _mean_across_ranks(total: float, count: float, device: torch.device) -> float:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1.0)


def run_worker(task: Task, config: dict) -> dict:
    """``train_loop_per_worker`` body. Returns rank 0's final metrics and sample captions."""
    import ray.train
    from ray.train import Checkpoint

    from dvsa.ingest import iter_eval_batches, iter_train_batches
    from dvsa.text import Vocab
    from dvsa.tracking import RunLogger
    from dvsa.train.build import build_model

    cfg = from_dict(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = common.train_device()
    on_cuda = device.type == "cuda"
    use_amp = t.amp and on_cuda
    common.seed_everything(t.seed)

    vocab = Vocab.load(config["vocab"])
    model = build_model(cfg, vocab)
    step, epoch, resumed = 0, 0, False
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(d)
        model.load_state_dict(state["model"])
        step, epoch, resumed = int(state["step"]), int(state["epoch"]), True
    ckpt_metrics = dict(state.get("metrics") or {}) if state is not None else {}
    common.seed_everything(t.seed + 1000003 * step + rank)   # data-order/dropout streams differ per rank and resume

    model = ray.train.torch.prepare_model(model)        # to device; DDP when world > 1
    bare = common.unwrap(model)
    optimizer = build_optimizer(model.parameters(), t)
    scheduler = common.build_scheduler(optimizer, t, config.get("total_steps") or 1)
    if state is not None:
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
    del state

    progress = Progress(config.get("progress_dir"), rank)
    progress.start(step, epoch, resumed)
    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else None
    name = config.get("train_name", "")
    if rank == 0:
        how = f"resumed from step {step} (epoch {epoch})" if resumed else "from scratch"
        log.info("[%s] %s: %d worker(s) on %s, %s, %s", name, task.name, world, device.type,
                 "bf16 autocast" if use_amp else "fp32", how)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if rank == 0 else None
    val_state: dict = {}
    params = [p for p in model.parameters() if p.requires_grad]
    last_metrics: dict = {}
    samples: list = []
    max_steps = t.max_steps
    try:
        if resumed and (epoch >= t.epochs or (max_steps and step >= max_steps)):
            # resumed from the final checkpoint (e.g. the driver died between that checkpoint
            # and the run's end): nothing to train; report its metrics once so that the run
            # (and a Tune trial's scheduler) ends on them rather than on nothing
            last_metrics = ckpt_metrics
            ray.train.report(ckpt_metrics if rank == 0 else {"epoch": epoch, "step": step})
        while epoch < t.epochs and not (max_steps and step >= max_steps):
            model.train()
            t0 = time.perf_counter()
            loss_sum, loss_n, images = 0.0, 0, 0
            window = torch.zeros((), device=device)
            window_n = 0
            # pinned host batches, non-blocking copies on CUDA; a seeded shuffle buffer per epoch
            for batch in iter_train_batches(train_shard, cfg.data.batch_size, device, cfg.data.prefetch_batches,
                                            epoch=epoch, seed=t.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                            drop_last=True):
                with common.autocast(device, use_amp):
                    loss = task.loss(model, batch, cfg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip_gradients(params, t.grad_clip, t.grad_clip_mode)
                optimizer.step()
                scheduler.step()
                step += 1
                images += len(batch["box_mask"])   # rows = images (also in feature mode, no "images")
                window += loss.detach().float()
                window_n += 1
                if step % t.log_every == 0 or (max_steps and step >= max_steps):
                    w = float(window) / window_n
                    loss_sum += w * window_n
                    loss_n += window_n
                    window.zero_()
                    window_n = 0
                    if logger is not None:
                        logger.log_metrics({"train/loss": w, "train/lr": scheduler.get_last_lr()[0]},
                                           step, flush=False)
                progress.update(step, epoch)
                if max_steps and step >= max_steps:
                    break
            if window_n:
                loss_sum += float(window)
                loss_n += window_n
            train_time = time.perf_counter() - t0
            epoch += 1
            last = epoch >= t.epochs or bool(max_steps and step >= max_steps)
            metrics = {"epoch": epoch, "step": step,
                       "train/epoch_loss": _mean_across_ranks(loss_sum, loss_n, device),
                       "train/images_per_s": images * world / max(train_time, 1e-9)}
            do_val = _is_val_epoch(epoch, cfg, last)
            do_ckpt = _is_checkpoint_epoch(epoch, cfg, last)
            if rank == 0 and do_val:
                t1 = time.perf_counter()
                bare.eval()
                with torch.no_grad(), common.autocast(device, use_amp):
                    vctx = ValidationContext(
                        model=bare, cfg=cfg, vocab=vocab, device=device, state=val_state,
                        batches=cap_images(iter_eval_batches(val_shard, cfg.data.val_batch_size, device,
                                                             cfg.data.prefetch_batches),
                                           cfg.data.max_val_images))
                    val_metrics, samples = task.validate(vctx)
                metrics.update(val_metrics)
                metrics["val/time_s"] = time.perf_counter() - t1
            if rank == 0:
                last_metrics = dict(metrics)
                if logger is not None:
                    logger.log_metrics(metrics, step, flush=True)
                shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                 if k not in ("epoch", "step") and isinstance(v, (int, float)))
                log.info("[%s] epoch %d/%d step %d %s (%.1f s train)", name, epoch, t.epochs, step, shown,
                         train_time)
            if rank == 0 and do_ckpt:
                with tempfile.TemporaryDirectory(prefix="dvsa-ckpt-") as tmp:
                    save_checkpoint(tmp, model=bare, optimizer=optimizer, scheduler=scheduler, step=step,
                                    epoch=epoch, vocab=vocab, cfg=cfg, metrics=metrics)
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
                progress.update(step, epoch, checkpointed_step=step)
            else:
                ray.train.report(metrics if rank == 0 else {"epoch": epoch, "step": step})
    finally:
        if logger is not None:
            logger.flush()
        scorer = val_state.get("scorer")
        if scorer is not None:
            scorer.close()
    return {"step": step, "epoch": epoch, "metrics": last_metrics, "samples": samples,
            "picture": val_state.get("picture")}
