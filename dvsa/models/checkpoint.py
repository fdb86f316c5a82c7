"""The checkpoint directory: what a train loop saves, read back without pickle.

A checkpoint is a directory (what ``ray.train.Checkpoint.from_directory`` uploads to
``storage_path``) holding::

    state.pt          model, optimizer, scheduler state dicts + step, epoch, metrics (tensors and
                      plain Python values only: read back with torch.load(weights_only=True))
    vocab.json        the vocabulary the model was trained with
    config.yaml       the resolved config
    checkpoint.json   step, epoch, metrics and task in plain JSON (for humans and listings)

Finding a checkpoint (a run dir, a URL, an MLflow run id) is :mod:`dvsa.inference.checkpoints`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from dvsa.config import Config, ConfigError, from_dict
from dvsa.errors import DvsaError
from dvsa.models.build import build_model
from dvsa.models.weights import load_into, load_weights_only
from dvsa.text import Vocab

STATE_FILE = "state.pt"
VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.yaml"
META_FILE = "checkpoint.json"   # step, epoch, metrics in plain JSON (for humans and listings)


def score_metric(cfg: Config) -> tuple[str, str]:
    """(metric, "max"|"min") that ranks a run's checkpoints (best-k keeping, "best" loading):
    the validation metric, or ``step`` (the most recent first) with ``train.checkpoint_select=last``."""
    if cfg.train.checkpoint_select == "last":
        return "step", "max"
    if cfg.task == "align":
        return "val/rsum", "max"
    return "val/METEOR", "max"


def save_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    step: int, epoch: int, vocab: Vocab, cfg: Config, metrics: Optional[dict] = None) -> Path:
    """Write one checkpoint directory. ``model`` is the bare module (not DDP); ``epoch`` counts
    completed epochs, ``step`` completed optimizer steps."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    plain_metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "epoch": int(epoch),
        "metrics": plain_metrics,
    }
    torch.save(state, d / STATE_FILE)
    vocab.save(str(d / VOCAB_FILE))
    cfg.save(d / CONFIG_FILE)
    (d / META_FILE).write_text(json.dumps({"step": int(step), "epoch": int(epoch), "metrics": plain_metrics,
                                           "task": cfg.task}, indent=2))
    return d


def load_state(directory: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """The ``state.pt`` of a checkpoint dir, loaded without pickle (``weights_only=True``)."""
    p = Path(directory)
    p = p if p.name == STATE_FILE else p / STATE_FILE
    if not p.is_file():
        raise DvsaError(f"{p}: no such checkpoint file")
    state = load_weights_only(p, f"{p}: cannot load checkpoint", map_location)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise DvsaError(f"{p}: not a dvsa checkpoint (no model state dict in it)")
    return state


def write_inference_copy(directory: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A checkpoint directory at ``out`` with what inference needs of the one at ``directory``:
    ``state.pt`` holding the model weights (read with ``weights_only=True``; step, epoch and
    metrics kept, optimizer and scheduler state left out), ``vocab.json``, ``config.yaml`` and
    ``checkpoint.json``. Loads like any checkpoint (:func:`load_checkpoint_dir`); returns ``out``."""
    src, dst = Path(directory), Path(out)
    state = load_state(src)
    dst.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state["model"], "optimizer": None, "scheduler": None, "step": int(state.get("step", 0)),
                "epoch": int(state.get("epoch", 0)), "metrics": dict(state.get("metrics") or {})}, dst / STATE_FILE)
    for name in (VOCAB_FILE, CONFIG_FILE, META_FILE):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
        elif name != META_FILE:
            raise DvsaError(f"{src / name}: no such file (a checkpoint holds {STATE_FILE}, {VOCAB_FILE}, "
                            f"{CONFIG_FILE})")
    return dst


def load_config_file(directory: str | os.PathLike) -> Config:
    import yaml

    p = Path(directory) / CONFIG_FILE
    if not p.is_file():
        raise DvsaError(f"{p}: checkpoint has no config")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DvsaError(f"{p}: invalid YAML{where}: {getattr(e, 'problem', None) or type(e).__name__}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DvsaError(f"{p}: cannot read ({type(e).__name__}: {e})") from None
    if raw is not None and not isinstance(raw, dict):
        raise DvsaError(f"{p}: not a dvsa config (top level is a {type(raw).__name__}, not a mapping)")
    try:
        return from_dict(raw or {})
    except ConfigError as e:
        raise DvsaError(f"{p}: {e}") from None


def check_checkpoint_dir(directory: str | os.PathLike) -> Config:
    """Everything a load reads, checked without building the model (no pretrained backbone file
    needed, nothing started): the config, the vocabulary and the state file. Returns the config;
    a DvsaError naming the file otherwise."""
    d = Path(directory)
    cfg = load_config_file(d)
    Vocab.load(str(d / VOCAB_FILE))
    load_state(d)
    return cfg


def load_checkpoint_dir(directory: str | os.PathLike, map_location: Any = "cpu"
                        ) -> tuple[torch.nn.Module, Vocab, Config]:
    """``(model, vocab, cfg)`` of one local checkpoint directory, the model in eval mode:
    what :func:`dvsa.models.build.build_model` makes for ``cfg.task``, with the saved weights."""
    d = Path(directory)
    cfg = load_config_file(d)
    vocab = Vocab.load(str(d / VOCAB_FILE))
    state = load_state(d, map_location=map_location)
    model = build_model(cfg, vocab)
    load_into(model, state["model"], str(d / STATE_FILE), f"the {cfg.task} model its {CONFIG_FILE} describes")
    model.eval()
    return model, vocab, cfg
