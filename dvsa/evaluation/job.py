"""``dvsa evaluate`` as a library call: load a checkpoint, evaluate it on a split, and log the
result into the MLflow run that trained it.

* a captioner (full-frame or region): every merged region group of the split is a query
  (section 4.4, :mod:`dvsa.evaluation.regions`, a Ray Data job) -> ``region/METEOR``,
  ``region/Bleu_1..4``, ``region/ROUGE_L``, ``region/CIDEr``; with ``on="fullframe"`` whole
  images against their sentences -> ``fullframe/...``;
* an alignment model: image-sentence retrieval (:mod:`dvsa.evaluation.alignment_eval`) ->
  ``retrieval/i2t_r1`` ... ``retrieval/t2i_medr`` (full split) and, with >= 1,000 images,
  ``retrieval_1k/...`` (mean over 1K folds); the notes say which is which.

The model's own settings come from its checkpoint; the evaluation environment (``EVAL_KEYS``:
where the shards are, ``out``, ``mlflow.*``, ``ray.*``, the decoder) may be set by a preset or
``key=value``; anything that would change the trained model is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from dvsa import runtime, tracking
from dvsa.config import Config, ConfigError, flatten, load_config, parse_overrides, read_preset
from dvsa.errors import DataError, DvsaError
from dvsa.evaluation.alignment_eval import evaluate_retrieval
from dvsa.evaluation.regions import RegionEvalOptions, draw_examples, evaluate_regions, sample_table
from dvsa.inference.alignment_figure import alignment_figure, first_sample
from dvsa.inference.checkpoints import check_checkpoint, load_trained
from dvsa.models.checkpoint import META_FILE
from dvsa.text import Vocab

# keys of the evaluation environment (the rest of the config is the trained model's)
EVAL_KEYS = ("data.shards", "data.fullframe_shards", "data.jpeg_decoder", "out", "mlflow.tracking_uri",
             "mlflow.experiment", "mlflow.run_name", "ray.address", "ray.num_cpus", "ray.num_gpus",
             "caption.decode", "caption.beam_size", "caption.temperature", "train.use_gpu")


# --------------------------------------------------------------------------- config


def _given_keys(config_file: Optional[str], overrides: list[str]) -> tuple[set, set]:
    """(keys set in the YAML file, keys set by key=value overrides)."""
    file_keys: set = set()
    if config_file:
        file_keys = set(flatten(read_preset(config_file)))
    return file_keys, set(parse_overrides(overrides))


def environment_config(config_file: Optional[str], overrides: list[str]) -> tuple[Config, set]:
    """The validated evaluation config (before the checkpoint is known) and the keys given."""
    env = load_config(config_file, overrides)
    file_keys, override_keys = _given_keys(config_file, overrides)
    refused = sorted(k for k in override_keys if k not in EVAL_KEYS)
    if refused:
        raise ConfigError(f"{refused[0]}: cannot be changed at evaluation (it is the trained model's; "
                          f"allowed: {', '.join(EVAL_KEYS)})")
    return env, {k for k in file_keys | override_keys if k in EVAL_KEYS}


def merged_config(trained: Config, env: Config, given: set) -> Config:
    """The checkpoint's config with the evaluation environment's given keys applied."""
    flat = env.flat()
    return trained.replace(**{k: flat[k] for k in given})


# --------------------------------------------------------------------------- MLflow run


def _open_run(uri: str, cfg: Config, req: EvalRequest, ckpt_dir: Path, notes: list[str]
              ) -> tuple[tracking.RunLogger, bool]:
    """(RunLogger, created) for the run to log into."""
    run_id = req.run_id or tracking.find_checkpoint_run(uri, req.checkpoint, ckpt_dir)
    if run_id is not None:
        if tracking.find_run(uri, run_id) is None:
            raise DvsaError(f"--run-id {run_id}: no such MLflow run in {uri}")
        return tracking.RunLogger(uri, run_id), False
    tags = {"task": cfg.task, tracking.CHECKPOINT_TAG: str(ckpt_dir), "dvsa.evaluation_only": "true"}
    if cfg.task == "caption":
        tags.update(mode=cfg.caption.mode, cell=cfg.caption.cell)
    logger, _ = tracking.start_run(uri, cfg.mlflow.experiment, cfg.mlflow.run_name or f"eval-{ckpt_dir.name}", tags)
    logger.log_params(cfg.flat())
    notes.append(f"no MLflow run holds {ckpt_dir}; logging into a new run {logger.run_id} "
                 f"(experiment {cfg.mlflow.experiment!r})")
    return logger, True


def _checkpoint_step(ckpt_dir: Path) -> int:
    meta = ckpt_dir / META_FILE
    try:
        return int(json.loads(meta.read_text()).get("step", 0)) if meta.is_file() else 0
    except (ValueError, OSError):
        return 0


# --------------------------------------------------------------------------- evaluation


def evaluate_captioner(cfg: Config, ckpt_dir: Path, req: EvalRequest, out_dir: Path, notes: list[str],
                       tracking_uri: Optional[str] = None) -> tuple[dict, list, list[dict]]:
    """Metrics, Fig. 10 paths, sample-table rows of a captioner (a Ray Data job). An MLflow
    model URI goes to the captioning actors as it is (each resolves it from ``tracking_uri``)."""
    queries = "groups" if req.on == "region" else "images"
    shards = cfg.data.shards if req.on == "region" else (cfg.data.fullframe_shards or cfg.data.shards)
    _check_shards(shards, "data.shards" if req.on == "region" else "data.fullframe_shards")
    with runtime.ray_session(Path(cfg.out).resolve(), cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus):
        ref = req.checkpoint if tracking.is_model_uri(req.checkpoint) else str(ckpt_dir)
        result = evaluate_regions(ref, shards, req.split, RegionEvalOptions(
            queries=queries, max_queries=req.max_groups, batch_size=req.batch_size, concurrency=req.concurrency,
            use_gpu=True if cfg.train.use_gpu else None, num_meteor_actors=req.meteor_actors,
            decode=cfg.caption.decode, beam_size=cfg.caption.beam_size), tracking_uri=tracking_uri)
    if result.skipped:
        notes.append(f"skipped images (counted, not scored): {result.skipped}")
    if result.expected is not None and result.expected != result.queries:
        notes.append(f"{result.queries} queries scored; the manifest announces {result.expected} for {req.split}")
    with open(out_dir / "predictions.jsonl", "w") as f:
        for p in result.predictions:
            f.write(json.dumps(p) + "\n")
    pictures = draw_examples(result, shards, req.split, out_dir, req.examples) if req.examples > 0 else []
    metrics = dict(result.metrics)
    prefix = "region" if queries == "groups" else "fullframe"
    metrics[f"{prefix}/images"] = float(result.images)
    metrics[f"{prefix}/skipped_images"] = float(sum(result.skipped.values()))
    return metrics, pictures, sample_table(result.predictions)


def evaluate_alignment(cfg: Config, model: torch.nn.Module, vocab: Vocab, req: EvalRequest) -> dict:
    shards = cfg.data.fullframe_shards or cfg.data.shards
    _check_shards(shards, "data.fullframe_shards" if cfg.data.fullframe_shards else "data.shards")
    metrics, emb = evaluate_retrieval(model, vocab, cfg, shards, req.split, max_images=req.max_images,
                                      device="cuda" if cfg.train.use_gpu else None)
    metrics["retrieval/skipped_images"] = float(sum(emb.skipped.values()))
    return metrics


def _alignment_pictures(cfg: Config, model: torch.nn.Module, vocab: Vocab, split: str, out_dir: Path,
                        notes: list[str]) -> list[Path]:
    """Fig. 5 for the split's first image-sentence pair: the box the MRF aligns each word to."""
    shards = cfg.data.fullframe_shards or cfg.data.shards
    try:
        key, jpg, meta = first_sample(shards, split)
    except DataError as e:
        notes.append(f"no alignment picture: {e}")
        return []
    path = out_dir / f"alignment_{key}.png"
    return [alignment_figure(model, vocab, cfg, jpg, meta, path)]


def _check_shards(root: str, key: str) -> None:
    if "://" not in str(root) and not Path(root).is_dir():
        raise DataError(f"{key}: no such shard directory: {root} (set it with {key}=DIR)")


@dataclass
class EvalRequest:
    """What ``dvsa evaluate`` was asked (see its ``--help``)."""

    checkpoint: str
    split: str = "test"
    on: str = "region"                      # captioners: "region" groups or "fullframe" images
    max_groups: Optional[int] = None        # captioners: score only the first N queries
    max_images: Optional[int] = None        # alignment models: only the first N images
    config_file: Optional[str] = None       # YAML preset of the evaluation environment
    overrides: list[str] = field(default_factory=list)
    run_id: Optional[str] = None            # log into this run instead of the checkpoint's
    meteor_actors: int = 2
    concurrency: int = 1
    batch_size: int = 8
    examples: int = 3                       # images drawn in the Fig. 10 picture(s)


@dataclass
class EvalOutcome:
    task: str
    checkpoint: str
    run_id: str
    tracking_uri: str
    metrics: dict
    outputs: str
    pictures: list[str]
    notes: list[str]                        # what the user should know (skips, a new run, ...)


def evaluate_checkpoint(req: EvalRequest) -> EvalOutcome:
    """Evaluate a checkpoint and log the metrics, pictures and predictions into its MLflow run
    (found by run id or the checkpoint's tags; a new run when none holds it)."""
    runtime.quiet_environment()
    if req.max_groups is not None and req.max_groups < 1:
        raise DvsaError(f"--max-groups must be >= 1, got {req.max_groups}")
    env, given = environment_config(req.config_file, req.overrides)
    runtime.warn_without_tracking_server(env.ray.address, env.mlflow.tracking_uri)   # a run id needs a server
    uri = tracking.tracking_uri(Path(env.out).resolve(), env.mlflow.tracking_uri)
    ckpt_dir, trained = check_checkpoint(req.checkpoint, uri)   # a bad checkpoint: one line, before MLflow and Ray
    cfg = merged_config(trained, env, given)
    runtime.require_shared_paths(cfg.ray.address, {"data.shards": cfg.data.shards})
    if not (tracking.is_run_id(req.checkpoint) or tracking.is_model_uri(req.checkpoint)):
        # a path: the run lives where its training logged it (unless told otherwise)
        uri = tracking.tracking_uri(Path(cfg.out).resolve(), cfg.mlflow.tracking_uri)
    tracking.prepare_store(uri, cfg.mlflow.experiment)
    notes: list[str] = []
    logger, created = _open_run(uri, cfg, req, ckpt_dir, notes)
    out_dir = Path(cfg.out).resolve() / "eval" / logger.run_id / req.split
    out_dir.mkdir(parents=True, exist_ok=True)
    status = "FAILED"
    pictures: list = []
    try:
        table: list[dict] = []
        if cfg.task == "caption":
            metrics, pictures, table = evaluate_captioner(cfg, ckpt_dir, req, out_dir, notes, uri)
        else:
            model, vocab, _ = load_trained(str(ckpt_dir))
            metrics = evaluate_alignment(cfg, model, vocab, req)
            pictures = _alignment_pictures(cfg, model, vocab, req.split, out_dir, notes)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        _log_evaluation(logger, req.split, ckpt_dir, out_dir, metrics, pictures, table,
                        req.checkpoint if tracking.is_model_uri(req.checkpoint) else str(ckpt_dir))
        status = "FINISHED"
    finally:
        if created:
            logger.end(status)
        else:
            logger.flush()
    return EvalOutcome(task=cfg.task, checkpoint=str(ckpt_dir), run_id=logger.run_id, tracking_uri=uri,
                       metrics=metrics, outputs=str(out_dir), pictures=[str(p) for p in pictures], notes=notes)


def _log_evaluation(logger: tracking.RunLogger, split: str, ckpt_dir: Path, out_dir: Path, metrics: dict,
                    pictures: list, table: list[dict], checkpoint: str) -> None:
    logger.log_metrics(metrics, step=_checkpoint_step(ckpt_dir))
    logger.set_tags({"dvsa.eval.split": split, "dvsa.eval.checkpoint": checkpoint})
    art = f"eval/{split}"
    for p in pictures:
        logger.log_artifact(p, f"{art}/pictures")
    if table:
        logger.log_table(table, f"{art}/sample_captions.json")
    for name in ("metrics.json", "predictions.jsonl"):
        if (out_dir / name).is_file():
            logger.log_artifact(out_dir / name, art)
