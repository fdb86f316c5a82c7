"""Driver side of a training job: the code path shared by ``dvsa train-*`` and ``jobs/train_*``.

1. validate (before any Ray work): task, shards + manifest + vocabulary + both splits, Java for
   the captioners' METEOR; every problem is one line (ConfigError / DataError / DvsaError);
2. create (or, for a re-run with the same ``train.name``, reopen) the MLflow run: tags
   task/mode/dataset, params = the resolved config;
3. start an embedded local Ray, join ``ray.address`` / ``RAY_ADDRESS``, or reuse a running one;
4. build the streaming train/val datasets (:func:`dvsa.ingest.build_dataset`) and fit a
   ``TorchTrainer`` (:func:`dvsa.train.common.build_trainer`); rank 0 logs into the run;
5. log the outcome: best-checkpoint summary metrics, the checkpoint reference (tag + json),
   vocabulary, resolved config, sample captions table, loss-curve PNG, and the best checkpoint
   as the run's MLflow model ``runs:/<run id>/model``, registered as a new version of
   ``mlflow.registered_model`` (:func:`registered_model_name`); end the run.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from dvsa import runtime, tracking, viz
from dvsa.config import Config, ConfigError, registry_name
from dvsa.data.manifest import Manifest
from dvsa.errors import DataError, DvsaError
from dvsa.ingest import SkipCounter, build_dataset
from dvsa.models.checkpoint import META_FILE, score_metric
from dvsa.text import Vocab
from dvsa.train import placement
from dvsa.train.common import build_trainer, run_name
from dvsa.train.skips import SkipPlan, summary_lines
from dvsa.viz import draw_region_captions

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    name: str                       # Ray Train run name (re-run with it to resume)
    run_dir: str                    # <storage_path>/<name>
    run_id: str                     # MLflow run id
    tracking_uri: str
    checkpoint: Optional[str]       # best checkpoint (by the validation metric)
    latest_checkpoint: Optional[str]
    step: int
    epoch: int
    metrics: dict = field(default_factory=dict)   # last epoch's metrics (rank 0)
    resumed: bool = False


# --------------------------------------------------------------------------- validation


def shards_root(cfg: Config) -> str:
    """Region captioner: ``data.shards`` (Visual Genome); full-frame captioner and alignment
    model: ``data.fullframe_shards`` (Karpathy split) when set, else ``data.shards``."""
    if cfg.task == "caption" and cfg.caption.mode == "region":
        return cfg.data.shards
    return cfg.data.fullframe_shards or cfg.data.shards


def check_inputs(cfg: Config, task: str) -> Manifest:
    """Everything a job needs before Ray starts; returns the shards' manifest."""
    if cfg.task != task:
        raise ConfigError(f"task: this job trains {task!r} but the config says {cfg.task!r}")
    runtime.require_shared_paths(cfg.ray.address, shared_paths(cfg))
    runtime.warn_without_tracking_server(cfg.ray.address, cfg.mlflow.tracking_uri)
    root = shards_root(cfg)
    key = "data.shards" if root == cfg.data.shards else "data.fullframe_shards"
    if "://" not in root and not Path(root).is_dir():
        raise DataError(f"{key}: no such shard directory: {root} (run `dvsa prepare` first)")
    manifest = Manifest.read(root)
    manifest.check_shards(root)
    for split in ("train", "val"):
        if manifest.split_count(split, "images") <= 0:
            raise DataError(f"{key}: {root} has no {split} images (see its manifest.json)")

    Vocab.load(posixpath.join(root, "vocab.json"))
    if cfg.data.features and "://" not in cfg.data.features and not Path(cfg.data.features).is_dir():
        raise DataError(f"data.features: no such feature directory: {cfg.data.features}")
    if task == "caption":
        from dvsa.evaluation.meteor import check_java

        check_java()
    if cfg.train.use_gpu and cfg.train.gpus_per_worker <= 0:
        raise ConfigError("train.gpus_per_worker: must be > 0 when train.use_gpu is true")
    return manifest


def shared_paths(cfg: Config) -> dict[str, Optional[str]]:
    """The paths every node of a cluster must see: the shards it trains on and the checkpoints."""
    root = shards_root(cfg)
    return {"data.shards" if root == cfg.data.shards else "data.fullframe_shards": root,
            "data.features": cfg.data.features, "train.storage_path": cfg.train.storage_path}


def total_steps(cfg: Config, manifest: Manifest) -> int:
    """Optimizer steps the schedule spans: epochs x full batches per worker, capped by max_steps."""
    per_epoch = manifest.split_count("train", "images") // (cfg.data.batch_size * cfg.train.num_workers)
    total = max(1, per_epoch * cfg.train.epochs)
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def default_name(cfg: Config) -> str:
    if cfg.train.name:
        return cfg.train.name
    return f"{run_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_path(cfg: Config) -> str:
    p = cfg.train.storage_path
    return p if "://" in p else os.path.abspath(p)


# --------------------------------------------------------------------------- the job


def train(cfg: Config, task: str) -> TrainOutcome:
    """Run one training job end to end (see module doc); raises DvsaError subclasses."""
    manifest = check_inputs(cfg, task)
    env = runtime.quiet_environment()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = default_name(cfg)
    root = shards_root(cfg)
    uri = tracking.tracking_uri(out, cfg.mlflow.tracking_uri)
    tags = {"task": task, "dataset": manifest.source, tracking.TRAIN_NAME_TAG: name}
    if task == "caption":
        tags.update(mode=cfg.caption.mode, cell=cfg.caption.cell)
    logger, resumed = tracking.start_run(uri, cfg.mlflow.experiment, cfg.mlflow.run_name or name, tags,
                                         resume_name=cfg.train.name)
    changed = logger.log_params(cfg.flat())
    if changed:
        log.info("resumed run %s with changed settings: %s", logger.run_id, ", ".join(sorted(changed)))
    with tracking.ending(logger):
        with runtime.ray_session(out, cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus) as ray_info:
            log.info("Ray: %s", ray_info["mode"])
            if ray_info["mode"] != "joined":       # nothing will join a local Ray: refuse what cannot fit
                import ray

                placement.check_fits(cfg, ray.cluster_resources())
            trainer = make_trainer(cfg, task, name, manifest=manifest, env_vars=env,
                                   tracking_uri=uri, run_id=logger.run_id)
            result = _fit(trainer, cfg)
            skipped = summary_lines(trainer.dvsa_skip_counters)
        outcome = _outcome(cfg, name, logger, uri, result, resumed)
        aborted = (result.return_value or {}).get("aborted")
        if aborted:
            raise DataError(f"[{name}] stopped at epoch {outcome.epoch}: {aborted}")
        _log_outcome(cfg, logger, outcome, result, root)
        if skipped:
            print("\n".join(skipped), flush=True)
        return outcome


def make_trainer(cfg: Config, task: str, name: str, *, manifest: Optional[Manifest] = None,
                 callbacks: Optional[list] = None, env_vars: Optional[dict] = None,
                 tracking_uri: Optional[str] = None, run_id: Optional[str] = None):
    """The job's ``TorchTrainer`` (Ray must be initialised: the datasets are built here).

    ``run_id``/``tracking_uri``: the MLflow run rank 0 logs into (none: no worker logging, e.g.
    Tune trials, whose metrics reach MLflow through Tune). ``callbacks``: Ray Train
    ``UserCallback``s (e.g. Tune's ``TuneReportCallback``).
    """
    root = shards_root(cfg)
    manifest = manifest if manifest is not None else Manifest.read(root)
    loop_config = {
        "cfg": cfg.to_dict(),
        "vocab": posixpath.join(root, "vocab.json"),
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "train_name": name,
        "total_steps": total_steps(cfg, manifest),
        "progress_dir": str(Path(cfg.out).resolve() / "jobs" / name / "progress"),
    }
    datasets, counters = _datasets(cfg, task, root)
    val_images = manifest.split_count("val", "images")
    loop_config["skips"] = SkipPlan(
        counters, {"train": manifest.split_count("train", "images"),
                   "val": min(val_images, cfg.data.max_val_images) if cfg.data.max_val_images else val_images},
        cfg.data.max_skip_fraction).to_dict()
    trainer = build_trainer(_loop(task), cfg, loop_config, datasets, storage_path(cfg), name, env_vars,
                            callbacks=callbacks)
    trainer.dvsa_skip_counters = counters     # the driver prints their totals at the end
    return trainer


def _loop(task: str):
    if task == "align":
        from dvsa.train.align import train_loop_per_worker
    else:
        from dvsa.train.caption import train_loop_per_worker
    return train_loop_per_worker


def _datasets(cfg: Config, task: str, root: str) -> tuple[dict, dict]:
    """The train and val datasets, and their skip counters (by split)."""
    vocab = Vocab.load(posixpath.join(root, "vocab.json"))
    counter = SkipCounter()                   # one actor for the job, each split its own scope
    train_ds = build_dataset(root, "train", task, cfg, vocab, seed=cfg.train.seed,
                             skip_counter=counter.scoped("train"))
    val_ds = build_dataset(root, "val", task, cfg, vocab, seed=cfg.train.seed, shuffle=False,
                           preserve_order=True, skip_counter=counter.scoped("val"))
    counters = {"train": train_ds.dvsa_skips, "val": val_ds.dvsa_skips}
    if cfg.data.max_val_images:
        val_ds = val_ds.limit(cfg.data.max_val_images)
    return {"train": train_ds, "val": val_ds}, counters


def _fit(trainer, cfg: Config):
    import ray
    import ray.train
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    try:
        return trainer.fit()
    except ray.train.ControllerError as e:
        if isinstance(getattr(e, "controller_failure", None), WorkerGroupStartupTimeoutError):
            raise DvsaError(placement.startup_timeout_message(cfg, placement.alive_node_resources(),
                                                              ray.available_resources())) from e
        raise DvsaError(f"training failed: {_first_line(e)}") from e
    except (ray.train.TrainingFailedError, ray.train.WorkerGroupError) as e:
        raise DvsaError(f"training failed after the allowed restarts (train.max_failures): {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _checkpoint_path(ckpt) -> Optional[str]:
    return None if ckpt is None else str(ckpt.path)


def _outcome(cfg: Config, name: str, logger, uri: str, result, resumed: bool) -> TrainOutcome:
    ret = result.return_value or {}
    metric, mode = score_metric(cfg)
    best = None
    try:
        best = result.get_best_checkpoint(metric, mode)
    except Exception:  # no checkpoint carries the metric (e.g. zero epochs run)
        best = None
    latest = result.checkpoint
    return TrainOutcome(
        name=name, run_dir=posixpath.join(storage_path(cfg), name), run_id=logger.run_id, tracking_uri=uri,
        checkpoint=_checkpoint_path(best or latest), latest_checkpoint=_checkpoint_path(latest),
        step=int(ret.get("step", 0)), epoch=int(ret.get("epoch", 0)), metrics=dict(ret.get("metrics") or {}),
        resumed=resumed)


def _log_outcome(cfg: Config, logger, outcome: TrainOutcome, result, root: str) -> None:
    metric, mode = score_metric(cfg)
    best_metrics = {}
    if outcome.checkpoint:
        meta = Path(outcome.checkpoint) / META_FILE
        if meta.is_file():
            best_metrics = json.loads(meta.read_text()).get("metrics", {})
        logger.set_tags({tracking.CHECKPOINT_TAG: outcome.checkpoint, tracking.RUN_DIR_TAG: outcome.run_dir})
    summary = {f"best/{k}": v for k, v in best_metrics.items() if k.startswith("val/")}
    summary["final/step"] = outcome.step
    summary["final/epoch"] = outcome.epoch
    logger.log_metrics(summary, step=outcome.step)
    with tempfile.TemporaryDirectory(prefix="dvsa-art-") as tmp:
        ref = {"best": outcome.checkpoint, "latest": outcome.latest_checkpoint, "run_dir": outcome.run_dir,
               "name": outcome.name, "metric": metric, "mode": mode, "best_metrics": best_metrics,
               "best_checkpoints": [{"path": str(c.path), "metrics": {k: v for k, v in m.items()
                                                                     if isinstance(v, (int, float))}}
                                    for c, m in (result.best_checkpoints or [])]}
        logger.log_dict(ref, "checkpoint.json")
        logger.log_artifact(_copy(posixpath.join(root, "vocab.json"), Path(tmp) / "vocab.json"))
        cfg_path = Path(tmp) / "config.yaml"
        cfg.save(cfg_path)
        logger.log_artifact(cfg_path)
        samples = ((result.return_value or {}).get("samples")) or []
        if samples:
            logger.log_table(samples, "samples/val_captions.json")
        picture = (result.return_value or {}).get("picture")
        if picture:
            _log_picture(picture, Path(tmp) / f"regions_{picture['image_id']}.png", logger, outcome.name)
        curves = {k: logger.metric_history(k) for k in ("train/loss", "train/epoch_loss", "val/loss")}
        if any(curves.values()):
            png = viz.plot_curves(curves, Path(tmp) / "loss_curves.png", title=outcome.name)
            logger.log_artifact(png, "plots")
    model_line = _log_model(cfg, logger, outcome)
    shown = " ".join(f"{k} {v:.4g}" for k, v in outcome.metrics.items() if k.startswith("val/"))
    print(f"[{outcome.name}] done: step {outcome.step}, epoch {outcome.epoch}; {shown}\n"
          f"  {cfg.train.checkpoint_select} checkpoint: {outcome.checkpoint}\n"
          f"  MLflow run {outcome.run_id} ({outcome.tracking_uri})" + (f"\n  {model_line}" if model_line else ""),
          flush=True)


def registered_model_name(cfg: Config) -> Optional[str]:
    """The registry name a job's model is registered under: ``mlflow.registered_model``, else
    the job's train name (``train.name``, else ``<name>-<task>[-<mode>-<cell>]``: no timestamp,
    so re-training adds a version) made a valid name (:func:`dvsa.config.registry_name`); None
    when ``mlflow.log_model`` or ``mlflow.register_model`` is off."""
    if not (cfg.mlflow.log_model and cfg.mlflow.register_model):
        return None
    return cfg.mlflow.registered_model or registry_name(run_name(cfg))


def _log_model(cfg: Config, logger, outcome: TrainOutcome) -> Optional[str]:
    """Log the best checkpoint as the run's MLflow model and register it (tags
    ``dvsa.model_uri``, ``dvsa.registered_model``); the summary line. A failure is a warning:
    the training and its checkpoints stand."""
    if not (cfg.mlflow.log_model and outcome.checkpoint):
        return None
    from dvsa.inference.checkpoints import resolve_checkpoint
    from dvsa.inference.mlflow_model import log_model

    name = registered_model_name(cfg)
    try:
        logged = log_model(resolve_checkpoint(outcome.checkpoint), logger.uri, logger.run_id, registered_name=name,
                           step=outcome.step, tags={tracking.TRAIN_NAME_TAG: outcome.name})
    except Exception as e:
        log.warning("[%s] could not log the MLflow model: %s", outcome.name, e)
        return f"MLflow model: not logged ({type(e).__name__}: {tracking.first_line(e)})"
    tags = {tracking.MODEL_URI_TAG: logged.uri}
    if logged.registered:
        tags[tracking.REGISTERED_MODEL_TAG] = logged.registered
    logger.set_tags(tags)
    registered = f", registered as {logged.registered}" if logged.registered else ""
    return f"MLflow model: {logged.uri}{registered} (logged in {logged.seconds:.1f} s)"


def _log_picture(picture: dict, path: Path, logger, title: str) -> None:
    """The first validation image with its regions and the captions generated for them."""
    import numpy as np

    image = np.asarray(picture["image"], dtype=np.uint8)
    draw_region_captions(image, picture["boxes"], picture["captions"], picture["scores"], path,
                         title=f"{title}: validation image {picture['image_id']}")
    logger.log_artifact(path, "pictures")


def _copy(src: str, dst: Path) -> Path:
    import fsspec

    with fsspec.open(src, "rb") as f:
        dst.write_bytes(f.read())
    return dst


def outcome_dict(outcome: TrainOutcome) -> dict:
    return asdict(outcome)
