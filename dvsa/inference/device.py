"""Where a model runs: one choice for inference and for Ray Train workers."""

from __future__ import annotations

from typing import Optional

import torch


def pick_device(device: Optional[str] = None) -> torch.device:
    """``device`` as given; ``None`` or ``"auto"``: CUDA when there is a GPU, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def worker_device() -> torch.device:
    """The device Ray Train assigned to this worker (cuda:i or cpu); outside a Train worker
    (plain PyTorch, unit tests) the same choice as :func:`pick_device`."""
    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except Exception:  # not inside a Train worker
        return pick_device()
