"""Finding and loading a trained model: a checkpoint dir, its ``state.pt``, a Ray Train run dir
(its best checkpoint), a remote checkpoint URL, an MLflow run id (the run's ``dvsa.checkpoint``
tag), or an MLflow model URI (``runs:/<run id>/model``, ``models:/<name>/<version|latest>``,
``models:/<name>@<alias>``: the model's checkpoint files are downloaded from the tracking server
into the model cache, :func:`model_cache_dir`). The directory format itself is
:mod:`dvsa.models.checkpoint`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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


MODEL_CACHE_ENV = "DVSA_MODEL_CACHE"
MODEL_FILES = "artifacts"     # the subdirectory of an MLflow model holding its checkpoint files


def model_cache_dir() -> Path:
    """Where MLflow models' checkpoint files are downloaded: ``$DVSA_MODEL_CACHE``, else
    ``$XDG_CACHE_HOME/dvsa/models`` (``~/.cache/dvsa/models``)."""
    if os.environ.get(MODEL_CACHE_ENV):
        return Path(os.environ[MODEL_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dvsa" / "models"


def model_checkpoint(model_uri: str, tracking_uri: str) -> Path:
    """The local checkpoint dir of an MLflow model URI: its files (weights, vocabulary, config)
    downloaded once per logged model into :func:`model_cache_dir` (a logged model's files never
    change), read later with ``weights_only=True`` like any checkpoint. DvsaError naming the URI
    and the store when it does not resolve."""
    source = tracking.model_source(tracking_uri, model_uri)
    key = source.model_id or "loc-" + hashlib.sha256(source.location.encode()).hexdigest()[:24]
    cache = model_cache_dir()
    target = cache / key
    if (target / STATE_FILE).is_file():
        return target
    if target.exists():                  # not a finished download (removed by hand, ...): again
        shutil.rmtree(target, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        try:
            got = tracking.download_model_files(tracking_uri, source, MODEL_FILES, tmp)
        except Exception as e:
            raise DvsaError(f"--checkpoint {model_uri}: cannot download the model's files from {source.location} "
                            f"({type(e).__name__}: {tracking.first_line(e)})") from None
        if not (got / STATE_FILE).is_file():
            raise DvsaError(f"--checkpoint {model_uri}: not a dvsa model (no {MODEL_FILES}/{STATE_FILE} in it) "
                            f"in {tracking_uri}")
        try:
            got.rename(target)       # atomic: a reader never sees half a download
        except OSError:
            if not (target / STATE_FILE).is_file():   # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_checkpoint(path_or_run_id: str, tracking_uri: Optional[str] = None) -> Path:
    """A local checkpoint dir for a path, a Ray Train run dir, a remote URL, an MLflow run id or
    an MLflow model URI (``runs:/``, ``models:/``)."""
    s = str(path_or_run_id)
    if tracking.is_model_uri(s):
        return model_checkpoint(s, tracking_uri or tracking.tracking_uri(os.environ.get("DVSA_OUT", "runs")))
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
    raise DvsaError(f"{s}: no such checkpoint (expected a checkpoint dir, a Ray Train run dir, an MLflow run id "
                    f"or an MLflow model URI: {tracking.MODEL_URI_FORMS})")


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
