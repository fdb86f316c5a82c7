"""Finding and loading a trained model: a checkpoint dir, its ``state.pt``, a Ray Train run dir
(its best checkpoint), a remote checkpoint URL, or an MLflow run id (the run's
``dvsa.checkpoint`` tag). The directory format itself is :mod:`dvsa.models.checkpoint`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from dvsa import tracking
from dvsa.config import Config
from dvsa.errors import DvsaError
from dvsa.models.checkpoint import (
    CONFIG_FILE,
    META_FILE,
    STATE_FILE,
    check_checkpoint_dir,
    load_checkpoint_dir,
    load_config_file,
    score_metric,
)
from dvsa.text import Vocab


def best_checkpoint_dir(run_dir: str | os.PathLike, metric: Optional[str] = None, mode: str = "max") -> Path:
    """The best (by ``metric``) or else the latest ``checkpoint_*`` dir of a Ray Train run dir."""
    run = Path(run_dir)
    found = [(d, _checkpoint_info(d)) for d in sorted(run.glob("checkpoint_*")) if (d / STATE_FILE).is_file()]
    if not found:
        raise DvsaError(f"{run}: not a checkpoint: no {STATE_FILE} in it, and no checkpoint_*/{STATE_FILE} "
                        f"(a Ray Train run dir) either")
    if metric:
        scored = [(info["metrics"][metric], d) for d, info in found if metric in info.get("metrics", {})]
        if scored:
            scored.sort(key=lambda x: x[0], reverse=(mode == "max"))
            return scored[0][1]
    return max(found, key=lambda x: x[1].get("step", -1))[0]


def _checkpoint_info(checkpoint_dir: Path) -> dict:
    """The checkpoint's ``checkpoint.json`` (step, metrics), ``{}`` when it has none."""
    meta = checkpoint_dir / META_FILE
    if not meta.is_file():
        return {}
    try:
        info = json.loads(meta.read_text())
    except (ValueError, OSError) as e:
        raise DvsaError(f"{meta}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(info, dict):
        raise DvsaError(f"{meta}: not a checkpoint's metadata (a {type(info).__name__}, not an object)")
    return info


def resolve_checkpoint(path_or_run_id: str, tracking_uri: Optional[str] = None) -> Path:
    """A local checkpoint dir for a path, a Ray Train run dir, a remote URL or an MLflow run id."""
    s = str(path_or_run_id)
    p = Path(s)
    if p.is_file() and p.name == STATE_FILE:
        return p.parent
    if p.is_dir():
        if (p / STATE_FILE).is_file():
            return p
        present = [name for name in (CONFIG_FILE, META_FILE) if (p / name).is_file()]
        if present:   # a checkpoint dir missing its weights (a shard dir has a vocab.json too)
            raise DvsaError(f"{p}: incomplete checkpoint: no {STATE_FILE} beside its {', '.join(present)}")
        try:
            cfg = _any_config(p)
            metric, mode = score_metric(cfg) if cfg is not None else (None, "max")
        except DvsaError:
            metric, mode = None, "max"
        return best_checkpoint_dir(p, metric, mode)
    if "://" in s:
        from ray.train import Checkpoint

        return Path(Checkpoint(s).to_directory())
    if tracking.is_run_id(s):
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


def load_trained(path_or_run_id: str, tracking_uri: Optional[str] = None, map_location: Any = "cpu"
                 ) -> tuple[torch.nn.Module, Vocab, Config]:
    """``(model, vocab, cfg)`` of a trained checkpoint (anything :func:`resolve_checkpoint`
    accepts), the model in eval mode: a ``CaptioningModel`` for captioners, an
    ``AlignmentModel`` for the alignment task."""
    return load_checkpoint_dir(resolve_checkpoint(path_or_run_id, tracking_uri), map_location)


def check_checkpoint(path_or_run_id: str, tracking_uri: Optional[str] = None) -> tuple[Path, Config]:
    """``(local checkpoint dir, its config)`` once its config, vocabulary and state file have
    been read (:func:`dvsa.models.checkpoint.check_checkpoint_dir`): what a job checks before
    it starts Ray or opens an MLflow run, so a bad checkpoint is one line, early."""
    directory = resolve_checkpoint(path_or_run_id, tracking_uri)
    return directory, check_checkpoint_dir(directory)
