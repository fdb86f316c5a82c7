"""Optimiser construction and element-wise gradient clipping (section 3.3) from ``train.*``."""

from __future__ import annotations

from typing import Iterable, Union

import torch
from torch import nn

from dvsa.config import TrainConfig


def build_optimizer(params: Iterable, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer``: adam | rmsprop | sgd, with ``train.lr``, ``weight_decay``
    (the L2 term alpha of eq. 9) and ``momentum`` (sgd). Frozen parameters are left out."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: no trainable parameters")
    name, lr, wd = train_cfg.optimizer, train_cfg.lr, train_cfg.weight_decay
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.95, eps=1e-8, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train_cfg.momentum, weight_decay=wd)
    raise ValueError(f"train.optimizer: {name!r} is not one of 'adam', 'rmsprop', 'sgd'")


def clip_gradients(model_or_params: Union[nn.Module, Iterable], value: float, mode: str = "value") -> None:
    """``train.grad_clip`` (0 disables) by ``train.grad_clip_mode``: ``value`` clips every
    gradient element to [-value, value] (the paper, for its RNNs); ``norm`` rescales all
    gradients together so that their global L2 norm is at most ``value`` (the update keeps
    its direction; the alignment model of the demo trains better with it)."""
    if mode not in ("value", "norm"):
        raise ValueError(f"train.grad_clip_mode: {mode!r} is not one of 'value', 'norm'")
    if value <= 0:
        return
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    if mode == "value":
        torch.nn.utils.clip_grad_value_(params, value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)
