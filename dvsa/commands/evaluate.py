"""``dvsa evaluate --checkpoint RUN_ID_OR_PATH [--split test] [--max-groups N] [--config FILE] [key=value ...]``

Loads a trained model (:func:`dvsa.train.checkpoints.load_trained`) and evaluates it:

* a captioner (full-frame or region): every merged region group of the split is a query
  (section 4.4, :mod:`dvsa.evaluation.regions`, a Ray Data job) -> ``region/METEOR``,
  ``region/Bleu_1..4``, ``region/ROUGE_L``, ``region/CIDEr``; with ``--on fullframe`` whole
  images against their sentences -> ``fullframe/...``;
* an alignment model: image-sentence retrieval (:mod:`dvsa.evaluation.alignment_eval`) ->
  ``retrieval/i2t_r1`` ... ``retrieval/t2i_medr`` (full split) and ``retrieval_1k/...``.

Metrics go into the SAME MLflow run the checkpoint came from (found by run id, or by the
run's ``dvsa.checkpoint`` / ``dvsa.run_dir`` tags), so ``dvsa compare`` sees both captioners
of Table 5 side by side; artifacts: the Fig. 10 picture of a few test images, a table of
sample captions, all predictions (jsonl) and the metrics (json), also written under
``<out>/eval/<run>/``.

The model's own settings come from its checkpoint. ``--config``/``key=value`` set where to
evaluate: ``data.shards`` (VG shards: the region queries), ``data.fullframe_shards``, ``out``,
``mlflow.*``, ``ray.*``, and the decoder (``caption.decode``, ``caption.beam_size``,
``caption.temperature``); anything that would change the trained model is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

from dvsa.config import Config, ConfigError
from dvsa.errors import DvsaError

log = logging.getLogger(__name__)

HELP = "evaluate a checkpoint (captions: BLEU/METEOR/ROUGE-L/CIDEr; alignment: R@K)"

# keys of the evaluation environment (the rest of the config is the trained model's)
EVAL_KEYS = ("data.shards", "data.fullframe_shards", "data.jpeg_decoder", "out", "mlflow.tracking_uri",
             "mlflow.experiment", "mlflow.run_name", "ray.address", "ray.num_cpus", "ray.num_gpus",
             "caption.decode", "caption.beam_size", "caption.temperature", "train.use_gpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint dir, its state.pt, a Ray Train run dir, or an MLflow run id")
    parser.add_argument("--split", default="test", help="split of the shards to evaluate on (default: test)")
    parser.add_argument("--max-groups", type=int, default=None,
                        help="captioners: score only the first N queries (quick runs)")
    parser.add_argument("--max-images", type=int, default=None,
                        help="alignment models: use only the first N images of the split")
    parser.add_argument("--on", choices=("region", "fullframe"), default="region",
                        help="captioners: region groups of data.shards (default), or whole images "
                             "of data.fullframe_shards against their sentences")
    parser.add_argument("--config", default=None, help="YAML preset for the evaluation environment")
    parser.add_argument("--run-id", default=None, help="log into this MLflow run instead of the checkpoint's")
    parser.add_argument("--meteor-actors", type=int, default=2, help="Ray actors (JVMs) computing METEOR")
    parser.add_argument("--concurrency", type=int, default=1, help="captioning actors (one model each)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per captioning call")
    parser.add_argument("--examples", type=int, default=3, help="images drawn in the Fig. 10 picture(s)")
    parser.add_argument("--outcome-json", default=None, help="also write metrics + run id to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="e.g. data.shards=runs/data/vg caption.decode=beam caption.beam_size=5")


# --------------------------------------------------------------------------- config


def _given_keys(config_file: Optional[str], overrides: list[str]) -> tuple[set, set]:
    """(keys set in the YAML file, keys set by key=value overrides)."""
    import yaml

    from dvsa.config import flatten, parse_overrides

    file_keys: set = set()
    if config_file:
        raw = yaml.safe_load(Path(config_file).read_text()) or {}
        file_keys = set(flatten(raw)) if isinstance(raw, dict) else set()
    return file_keys, set(parse_overrides(overrides))


def environment_config(config_file: Optional[str], overrides: list[str]) -> tuple[Config, set]:
    """The validated evaluation config (before the checkpoint is known) and the keys given."""
    from dvsa.config import load_config

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


def find_checkpoint_run(uri: str, checkpoint_dir: Path) -> Optional[str]:
    """The id of the run whose ``dvsa.checkpoint`` tag is this dir, or whose ``dvsa.run_dir``
    holds it (newest first); None when no run matches."""
    from dvsa import tracking

    c = tracking.client(uri)
    exps = [e.experiment_id for e in tracking.retry_locked(c.search_experiments)]
    if not exps:
        return None
    d = str(checkpoint_dir.resolve())
    for tag, value in ((tracking.CHECKPOINT_TAG, d), ("dvsa.run_dir", str(Path(d).parent))):
        if "'" in value:
            continue
        runs = tracking.retry_locked(c.search_runs, exps, filter_string=f"tags.`{tag}` = '{value}'",
                                     max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            return runs[0].info.run_id
    return None


def _open_run(uri: str, cfg: Config, args, ckpt_dir: Path):
    """(RunLogger, created) for the run to log into."""
    from dvsa import tracking
    from dvsa.train.checkpoints import _RUN_ID

    run_id = args.run_id or (args.checkpoint if _RUN_ID.match(str(args.checkpoint)) else None)
    if run_id is None:
        run_id = find_checkpoint_run(uri, ckpt_dir)
    if run_id is not None:
        if tracking.find_run(uri, run_id) is None:
            raise DvsaError(f"--run-id {run_id}: no such MLflow run in {uri}")
        return tracking.RunLogger(uri, run_id), False
    tags = {"task": cfg.task, tracking.CHECKPOINT_TAG: str(ckpt_dir), "dvsa.evaluation_only": "true"}
    if cfg.task == "caption":
        tags.update(mode=cfg.caption.mode, cell=cfg.caption.cell)
    logger, _ = tracking.start_run(uri, cfg.mlflow.experiment, cfg.mlflow.run_name or f"eval-{ckpt_dir.name}", tags)
    logger.log_params(cfg.flat())
    print(f"note: no MLflow run holds {ckpt_dir}; logging into a new run {logger.run_id} "
          f"(experiment {cfg.mlflow.experiment!r})", flush=True)
    return logger, True


def _checkpoint_step(ckpt_dir: Path) -> int:
    from dvsa.train.checkpoints import META_FILE

    meta = ckpt_dir / META_FILE
    try:
        return int(json.loads(meta.read_text()).get("step", 0)) if meta.is_file() else 0
    except (ValueError, OSError):
        return 0


# --------------------------------------------------------------------------- evaluation


def evaluate_captioner(cfg: Config, ckpt_dir: Path, args, out_dir: Path) -> tuple[dict, list, list[dict]]:
    """Metrics, Fig. 10 paths, sample-table rows of a captioner (a Ray Data job)."""
    from dvsa import runtime
    from dvsa.evaluation.regions import draw_examples, evaluate_regions, sample_table

    queries = "groups" if args.on == "region" else "images"
    shards = cfg.data.shards if args.on == "region" else (cfg.data.fullframe_shards or cfg.data.shards)
    _check_shards(shards, "data.shards" if args.on == "region" else "data.fullframe_shards")
    with runtime.ray_session(Path(cfg.out).resolve(), cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus):
        result = evaluate_regions(str(ckpt_dir), shards, args.split, queries=queries,
                                  max_queries=args.max_groups, batch_size=args.batch_size,
                                  concurrency=args.concurrency,
                                  use_gpu=True if cfg.train.use_gpu else None,
                                  num_meteor_actors=args.meteor_actors, decode=cfg.caption.decode,
                                  beam_size=cfg.caption.beam_size)
    if result.skipped:
        print(f"skipped images (counted, not scored): {result.skipped}", flush=True)
    if result.expected is not None and result.expected != result.queries:
        print(f"note: {result.queries} queries scored; the manifest announces {result.expected} "
              f"for {args.split}", flush=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for p in result.predictions:
            f.write(json.dumps(p) + "\n")
    pictures = draw_examples(result, shards, args.split, out_dir, args.examples) if args.examples > 0 else []
    metrics = dict(result.metrics)
    prefix = "region" if queries == "groups" else "fullframe"
    metrics[f"{prefix}/images"] = float(result.images)
    metrics[f"{prefix}/skipped_images"] = float(sum(result.skipped.values()))
    return metrics, pictures, sample_table(result.predictions)


def evaluate_alignment(cfg: Config, model, vocab, args) -> dict:
    from dvsa.evaluation.alignment_eval import evaluate_retrieval

    shards = cfg.data.fullframe_shards or cfg.data.shards
    _check_shards(shards, "data.fullframe_shards" if cfg.data.fullframe_shards else "data.shards")
    metrics, emb = evaluate_retrieval(model, vocab, cfg, shards, args.split, max_images=args.max_images,
                                      device="cuda" if cfg.train.use_gpu else None)
    metrics["retrieval/skipped_images"] = float(sum(emb.skipped.values()))
    return metrics


def _check_shards(root: str, key: str) -> None:
    from dvsa.errors import DataError

    if "://" not in str(root) and not Path(root).is_dir():
        raise DataError(f"{key}: no such shard directory: {root} (set it with {key}=DIR)")


def format_metrics(metrics: dict) -> str:
    width = max(len(k) for k in metrics)
    return "\n".join(f"  {k:<{width}}  {v:.4f}" if abs(v) < 1e6 else f"  {k:<{width}}  {v:.4g}"
                     for k, v in metrics.items())


def run(args: argparse.Namespace) -> int:
    from dvsa import runtime, tracking
    from dvsa.train.checkpoints import _RUN_ID, load_config_file, load_trained, resolve_checkpoint

    runtime.quiet_environment()
    if args.max_groups is not None and args.max_groups < 1:
        raise DvsaError(f"--max-groups must be >= 1, got {args.max_groups}")
    env, given = environment_config(args.config, args.overrides)
    uri = tracking.tracking_uri(Path(env.out).resolve(), env.mlflow.tracking_uri)
    ckpt_dir = resolve_checkpoint(args.checkpoint, uri)
    cfg = merged_config(load_config_file(ckpt_dir), env, given)
    if not _RUN_ID.match(str(args.checkpoint)):
        # a path: the run lives where its training logged it (unless told otherwise)
        uri = tracking.tracking_uri(Path(cfg.out).resolve(), cfg.mlflow.tracking_uri)
    tracking.prepare_store(uri, cfg.mlflow.experiment)
    logger, created = _open_run(uri, cfg, args, ckpt_dir)
    out_dir = Path(cfg.out).resolve() / "eval" / logger.run_id / args.split
    out_dir.mkdir(parents=True, exist_ok=True)
    status = "FAILED"
    try:
        pictures: list = []
        table: list[dict] = []
        if cfg.task == "caption":
            metrics, pictures, table = evaluate_captioner(cfg, ckpt_dir, args, out_dir)
        else:
            model, vocab, _ = load_trained(str(ckpt_dir))
            metrics = evaluate_alignment(cfg, model, vocab, args)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.log_metrics(metrics, step=_checkpoint_step(ckpt_dir))
        logger.set_tags({"dvsa.eval.split": args.split, "dvsa.eval.checkpoint": str(ckpt_dir)})
        art = f"eval/{args.split}"
        for p in pictures:
            logger.log_artifact(p, f"{art}/pictures")
        if table:
            logger.log_table(table, f"{art}/sample_captions.json")
        for name in ("metrics.json", "predictions.jsonl"):
            if (out_dir / name).is_file():
                logger.log_artifact(out_dir / name, art)
        status = "FINISHED"
    finally:
        if created:
            logger.end(status)
        else:
            logger.flush()
    print(f"{cfg.task} model {ckpt_dir} on {args.split}:\n{format_metrics(metrics)}\n"
          f"  MLflow run {logger.run_id} ({uri})\n  outputs: {out_dir}", flush=True)
    if args.outcome_json:
        Path(args.outcome_json).write_text(json.dumps({"run_id": logger.run_id, "tracking_uri": uri,
                                                       "checkpoint": str(ckpt_dir), "metrics": metrics,
                                                       "outputs": str(out_dir),
                                                       "pictures": [str(p) for p in pictures]}, indent=2))
    return 0
