"""Optimiser construction and element-wise gradient clipping (section 3.3) from ``train.*``."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from dvsa.config import TrainConfig


def build_optimizer(params: Iterable, train_cfg: TrainConfig, lr: Optional[float] = None) -> torch.optim.Optimizer:
    """``train.optimizer``: adam | rmsprop | sgd, with ``lr`` (default ``train.lr``; the train
    loop passes the linearly scaled one, :func:`dvsa.train.common.scaled_lr`), ``weight_decay``
    (the L2 term alpha of eq. 9), ``momentum`` (sgd) and the kernels ``train.optimizer_impl``
    picks for the parameters' device. Frozen parameters are left out."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: no trainable parameters")
    name, wd = train_cfg.optimizer, train_cfg.weight_decay
    lr = train_cfg.lr if lr is None else lr
    kernels = optimizer_kernels(train_cfg.optimizer_impl, name, params[0].device.type)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, **kernels)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.95, eps=1e-8, weight_decay=wd, **kernels)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train_cfg.momentum, weight_decay=wd, **kernels)
    raise ValueError(f"train.optimizer: {name!r} is not one of 'adam', 'rmsprop', 'sgd'")


#: optimizers with a fused (one kernel for every parameter) implementation in torch
FUSED_OPTIMIZERS = ("adam", "sgd")


def optimizer_kernels(impl: str, optimizer: str, device_type: str) -> dict[str, Any]:
    """The torch optimizer's ``fused``/``foreach`` keyword for ``train.optimizer_impl``: ``auto``
    is fused on CUDA (foreach for rmsprop, which has no fused kernel) and foreach elsewhere;
    ``for_loop`` is the per-parameter reference implementation."""
    if impl == "auto":
        impl = "fused" if device_type == "cuda" and optimizer in FUSED_OPTIMIZERS else "foreach"
    if impl == "fused":
        if optimizer not in FUSED_OPTIMIZERS:
            raise ValueError(f"train.optimizer_impl: torch has no fused {optimizer} "
                             f"(fused: {', '.join(FUSED_OPTIMIZERS)})")
        return {"fused": True}
    if impl in ("foreach", "for_loop"):
        return {"foreach": impl == "foreach"}
    raise ValueError(f"train.optimizer_impl: {impl!r} is not one of 'auto', 'fused', 'foreach', 'for_loop'")


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


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable, train_cfg: TrainConfig) -> None:
    """One optimizer step on ``loss``: fresh gradients, clipped (``train.grad_clip``, by
    ``train.grad_clip_mode``), applied. The train loop and the benchmarks step the same way."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(params, train_cfg.grad_clip, train_cfg.grad_clip_mode)
    optimizer.step()
