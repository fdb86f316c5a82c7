"""Checkpoint directories: save from a train loop, load for resuming, evaluation and captioning.

A checkpoint is a directory (what ``ray.train.Checkpoint.from_directory`` uploads to
``storage_path``) holding::

    state.pt      model, optimizer, scheduler state dicts + step, epoch, metrics (tensors and
                  plain Python values only: read back with torch.load(weights_only=True))
    vocab.json    the vocabulary the model was trained with
    config.yaml   the resolved config

``load_trained(x)`` accepts a checkpoint dir, its ``state.pt``, a Ray Train run dir (its best
checkpoint is taken), or an MLflow run id (the run's ``dvsa.checkpoint`` tag).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from dvsa.config import Config, ConfigError, from_dict
from dvsa.errors import DvsaError

STATE_FILE = "state.pt"
VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.yaml"
META_FILE = "checkpoint.json"   # step, epoch, metrics in plain JSON (for humans and listings)
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def save_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    step: int, epoch: int, vocab, cfg: Config, metrics: Optional[dict] = None) -> Path:
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
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, or objects that need pickle
        raise DvsaError(f"{p}: cannot load checkpoint ({type(e).__name__}: {e})") from None


def load_config_file(directory: str | os.PathLike) -> Config:
    import yaml

    p = Path(directory) / CONFIG_FILE
    if not p.is_file():
        raise DvsaError(f"{p}: checkpoint has no config")
    try:
        return from_dict(yaml.safe_load(p.read_text()) or {})
    except ConfigError as e:
        raise DvsaError(f"{p}: {e}") from None


def best_checkpoint_dir(run_dir: str | os.PathLike, metric: Optional[str] = None, mode: str = "max") -> Path:
    """The best (by ``metric``) or else the latest ``checkpoint_*`` dir of a Ray Train run dir."""
    run = Path(run_dir)
    found = []
    for d in sorted(run.glob("checkpoint_*")):
        meta = d / META_FILE
        if not (d / STATE_FILE).is_file():
            continue
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        found.append((d, info))
    if not found:
        raise DvsaError(f"{run}: no checkpoints in this Ray Train run dir")
    if metric:
        scored = [(info["metrics"][metric], d) for d, info in found if metric in info.get("metrics", {})]
        if scored:
            scored.sort(key=lambda x: x[0], reverse=(mode == "max"))
            return scored[0][1]
    return max(found, key=lambda x: x[1].get("step", -1))[0]


def resolve_checkpoint(path_or_run_id: str, tracking_uri: Optional[str] = None) -> Path:
    """A local checkpoint dir for a path, a Ray Train run dir, a remote URL or an MLflow run id."""
    s = str(path_or_run_id)
    p = Path(s)
    if p.is_file() and p.name == STATE_FILE:
        return p.parent
    if p.is_dir():
        if (p / STATE_FILE).is_file():
            return p
        from dvsa.train.common import score_metric

        try:
            cfg = _any_config(p)
            metric, mode = score_metric(cfg) if cfg is not None else (None, "max")
        except DvsaError:
            metric, mode = None, "max"
        return best_checkpoint_dir(p, metric, mode)
    if "://" in s:
        from ray.train import Checkpoint

        return Path(Checkpoint(s).to_directory())
    if _RUN_ID.match(s):
        from dvsa import tracking

        uri = tracking_uri or tracking.tracking_uri(os.environ.get("DVSA_OUT", "runs"))
        run = tracking.find_run(uri, s)
        if run is None:
            raise DvsaError(f"{s}: no such checkpoint path, and no MLflow run with this id in {uri}")
        ref = run.data.tags.get(tracking.CHECKPOINT_TAG)
        if not ref:
            raise DvsaError(f"MLflow run {s} has no {tracking.CHECKPOINT_TAG} tag (did its training finish?)")
        return resolve_checkpoint(ref, uri)
    raise DvsaError(f"{s}: no such checkpoint (expected a checkpoint dir, a Ray Train run dir or an MLflow run id)")


def _any_config(run_dir: Path) -> Optional[Config]:
    for d in sorted(run_dir.glob("checkpoint_*")):
        if (d / CONFIG_FILE).is_file():
            return load_config_file(d)
    return None


def load_trained(path_or_run_id: str, tracking_uri: Optional[str] = None, map_location: Any = "cpu"):
    """``(model, vocab, cfg)`` of a trained checkpoint, the model in eval mode.

    ``model`` is what :func:`dvsa.train.build.build_model` makes for ``cfg.task``: a
    ``CaptioningModel`` for captioners, an ``AlignmentModel`` for the alignment task.
    """
    from dvsa.text import Vocab
    from dvsa.train.build import build_model

    d = resolve_checkpoint(path_or_run_id, tracking_uri)
    cfg = load_config_file(d)
    vocab = Vocab.load(str(d / VOCAB_FILE))
    state = load_state(d, map_location=map_location)
    model = build_model(cfg, vocab)
    model.load_state_dict(state["model"])
    model.eval()
    return model, vocab, cfg
