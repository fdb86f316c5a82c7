"""Pieces both train loops share: device and precision, seeding, the learning-rate schedule, and the
``TorchTrainer`` built from a :class:`dvsa.config.Config`.

Precision: on CUDA the forward pass runs under ``torch.autocast(dtype=bfloat16)`` (bf16 keeps
fp32's exponent range, so no loss scaling is needed) and host batches are pinned and copied
with ``non_blocking=True`` (:mod:`dvsa.ingest.torch_batches`); on the CPU the very same code
runs in fp32.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Callable, Optional

import numpy as np
import torch

from dvsa.config import Config, TrainConfig
from dvsa.models.checkpoint import score_metric
from dvsa.train import placement


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when ``enabled``; a no-op context on the CPU (fp32)."""
    if device.type == "cuda" and enabled:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def scaled_lr(cfg: Config) -> float:
    """``train.lr`` under the linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch
    SGD"): with ``train.lr_scale_batch`` = N > 0 the learning rate grows in proportion to the
    global batch, ``lr x data.batch_size x train.num_workers / N``; 0 keeps ``train.lr``."""
    t = cfg.train
    if not t.lr_scale_batch:
        return t.lr
    return t.lr * cfg.data.batch_size * t.num_workers / t.lr_scale_batch


def configure_backends(t: TrainConfig) -> None:
    """Process-wide switches: ``train.cudnn_benchmark`` (cuDNN times its convolution algorithms
    once per input shape and keeps the fastest; ingest batches have fixed shapes)."""
    torch.backends.cudnn.benchmark = bool(t.cudnn_benchmark)


def apply_step_switches(model: torch.nn.Module, t: TrainConfig) -> torch.nn.Module:
    """``train.channels_last`` and ``train.compile`` on a model's CNN(s), in place (parameter
    names, hence checkpoints, are unchanged): channels-last weights and inputs, and
    ``torch.compile`` of the CNN trunk (``cnn``) or of the whole model's forward (``model``)."""
    from dvsa.models.encoder import ImageEncoder

    encoders = [m for m in model.modules() if isinstance(m, ImageEncoder)]
    if t.channels_last:
        for enc in encoders:
            enc.use_channels_last()
    if t.compile == "cnn":
        for enc in encoders:
            enc.trunk.compile()
    elif t.compile == "model":
        model.compile()
    return model


def lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate after ``step`` optimizer steps.

    constant: 1; cosine: 0.5 (1 + cos(pi s / total)); step: x0.1 at 50% and again at 75%.
    """
    total = max(1, int(total_steps))
    if schedule == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
    if schedule == "step":
        return lambda s: 0.1 ** ((s >= total // 2) + (s >= (3 * total) // 4))
    return lambda s: 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t.lr_schedule, total_steps))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (``prepare_model`` with one worker returns the bare module)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def run_name(cfg: Config) -> str:
    """The Ray Train run name: ``train.name`` or ``<name>-<task>[-<mode>-<cell>]``."""
    if cfg.train.name:
        return cfg.train.name
    if cfg.task == "align":
        return f"{cfg.name}-align"
    return f"{cfg.name}-caption-{cfg.caption.mode}-{cfg.caption.cell}"


def build_trainer(loop: Callable[[dict], Any], cfg: Config, loop_config: dict, datasets: dict,
                  storage_path: str, name: str, env_vars: Optional[dict] = None,
                  callbacks: Optional[list] = None):
    """A ``TorchTrainer`` whose scaling, failure and checkpoint settings come from ``cfg.train``.

    Only the train dataset is split across workers; validation is kept whole (rank 0 scores it).
    ``callbacks``: extra Train ``RunConfig`` callbacks (a Tune trial passes ``TuneReportCallback``).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    placement.set_start_timeout(cfg)
    scaling = ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                            resources_per_worker=placement.worker_bundle(cfg))
    metric, order = score_metric(cfg)
    run = RunConfig(
        name=name,
        storage_path=storage_path,
        # a worker group that cannot be placed within train.start_timeout_s ends the run (0: Ray
        # Train's default, retried forever); dvsa.train.placement says what was missing
        failure_config=FailureConfig(max_failures=t.max_failures,
                                     controller_failure_limit=0 if t.start_timeout_s > 0 else -1),
        checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=metric,
                                           checkpoint_score_order=order),
        worker_runtime_env={"env_vars": dict(env_vars)} if env_vars else None,
        callbacks=list(callbacks) if callbacks else None,
    )
    return TorchTrainer(loop, train_loop_config=loop_config, scaling_config=scaling, run_config=run,
                        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]))
