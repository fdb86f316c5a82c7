"""Driver of a sweep: ``dvsa tune`` and ``python -m jobs.tune`` run :func:`run_sweep`.

1. check the config (search space, scheduler, metric) and the shards before Ray starts;
2. create the MLflow store, the experiment and the sweep's parent run here, in the driver (a
   fresh SQLite store migrated by several processes at once races), or reopen the parent of an
   interrupted sweep with the same name;
3. start / join / reuse Ray, cap the concurrency to what the cluster can place, and fit a
   ``tune.Tuner`` (ASHA or FIFO; random, grid or Optuna TPE; ``num_samples``,
   ``max_concurrent_trials``, ``time_budget_s``) whose trials train with
   :func:`dvsa.tuning.trial.trial_main`; :class:`MlflowTrials` logs the child runs;
   a sweep whose Tune experiment dir exists is restored (``Tuner.restore``): finished trials
   are kept, unfinished ones resume from their own Train checkpoints;
4. rank the trials, tag the best child run, write ``best_config.yaml`` and the summary table
   (printed, saved under ``<out>/sweeps/<name>/``, logged on the parent run).
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import time
from pathlib import Path
from typing import Optional

from dvsa import runtime, tracking
from dvsa.config import Config
from dvsa.data.manifest import Manifest
from dvsa.errors import DvsaError
from dvsa.train import launch
from dvsa.tuning import space
from dvsa.tuning.mlflow_callback import (
    BEST_TAG,
    EARLY_STOPPED,
    ERROR,
    FINISHED,
    ROLE_TAG,
    SWEEP_TAG,
    MlflowTrials,
    child_runs,
    trial_outcome,
)
from dvsa.tuning.report import SweepOutcome, TrialRow, best_config, format_table, table_rows, write_best_config
from dvsa.tuning.trial import trial_config, trial_main

log = logging.getLogger(__name__)


def sweep_name(cfg: Config) -> str:
    """``tune.name``, else ``<name>-tune-<task>-<time>`` (pass it back as tune.name to resume)."""
    return cfg.tune.name or f"{cfg.name}-tune-{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_parent_run(uri: str, experiment: str, name: str, tags: dict):
    """``(RunLogger, resumed)``: the sweep's parent run, reopened when one with this name exists."""
    exp_id = tracking.prepare_store(uri, experiment)
    c = tracking.client(uri)
    q = f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{ROLE_TAG}` = 'sweep'"
    found = tracking.retry_locked(c.search_runs, [exp_id], filter_string=q, max_results=1,
                                  order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        tracking.retry_locked(c.update_run, run_id, status="RUNNING")
        return tracking.RunLogger(uri, run_id), exp_id, True
    run = tracking.retry_locked(c.create_run, exp_id, run_name=name,
                                tags={**{k: str(v) for k, v in tags.items()}, SWEEP_TAG: name, ROLE_TAG: "sweep"})
    return tracking.RunLogger(uri, run.info.run_id), exp_id, False


def run_sweep(cfg: Config) -> SweepOutcome:
    """Run (or resume) the sweep ``cfg.tune`` describes; see the module doc. Raises DvsaError."""
    task = cfg.task
    space.check_sweep(cfg)
    manifest = launch.check_inputs(cfg, task)
    runtime.quiet_environment()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = sweep_name(cfg)
    storage = launch.storage_path(cfg)
    exp_dir = posixpath.join(storage, name)
    sweep_dir = out / "sweeps" / name
    uri = tracking.tracking_uri(out, cfg.mlflow.tracking_uri)
    tags = {"task": task, "dataset": manifest.source, "search": cfg.tune.search,
            "scheduler": cfg.tune.scheduler, "metric": cfg.tune.metric}
    if task == "caption":
        tags.update(mode=cfg.caption.mode, cell=cfg.caption.cell)
    parent, exp_id, resumed = open_parent_run(uri, cfg.mlflow.experiment, name, tags)
    parent.log_params(cfg.flat())
    child_tags = {k: v for k, v in tags.items() if k in ("task", "dataset", "mode", "cell")}
    with tracking.ending(parent):
        with runtime.ray_session(out, cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus) as info:
            import ray

            log.info("Ray: %s", info["mode"])
            resources = ray.cluster_resources()
            elastic = info["mode"] == "joined"
            concurrent = space.max_concurrent(cfg, resources, elastic)
            fit = space.trials_that_fit(cfg, resources)
            if elastic and fit < concurrent:
                log.warning("the cluster holds %d trial(s) at once now (%g CPUs, %g GPUs); the others wait for "
                            "the autoscaler to add nodes", fit, resources.get("CPU", 0), resources.get("GPU", 0))
            elif concurrent < cfg.tune.max_concurrent_trials:
                log.warning("tune.max_concurrent_trials=%d lowered to %d: the cluster cannot place more "
                            "trials' workers at once", cfg.tune.max_concurrent_trials, concurrent)
            callback = MlflowTrials(uri, exp_id, parent.run_id, name, cfg.to_dict(), storage, child_tags)
            tuner, restored = _tuner(cfg, name, storage, exp_dir, manifest, concurrent, callback)
            resumed = resumed or restored
            print(f"[{name}] {'resuming' if restored else 'starting'} sweep: {space.expected_trials(cfg)} "
                  f"trial(s), {concurrent} at a time; Tune dir {exp_dir}; MLflow parent run {parent.run_id}",
                  flush=True)
            results = tuner.fit()
        outcome = _outcome(cfg, name, exp_dir, uri, exp_id, parent.run_id, results, resumed)
        _report(cfg, parent, outcome, sweep_dir)
        return outcome


def _tuner(cfg: Config, name: str, storage: str, exp_dir: str, manifest: Manifest, concurrent: int, callback):
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(trial_main, base=cfg.to_dict(), sweep=name, storage_path=storage, manifest=manifest),
        space.trial_resources(cfg))
    if tune.Tuner.can_restore(exp_dir):
        log.info("restoring sweep %s from %s", name, exp_dir)
        log.warning("a resumed sweep keeps the search space, scheduler, num_samples and concurrency it started "
                    "with: tune.* settings changed since are not applied (start a new --name for those)")
        return tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=True), True
    t = cfg.tune
    tune_config = tune.TuneConfig(
        metric=t.metric, mode=t.mode, num_samples=t.num_samples, max_concurrent_trials=concurrent,
        scheduler=space.scheduler(cfg), search_alg=space.searcher(cfg), time_budget_s=t.time_budget_s,
        reuse_actors=False)
    run_config = tune.RunConfig(name=name, storage_path=storage, callbacks=[callback], verbose=1)
    return tune.Tuner(trainable, param_space=space.param_space(cfg), tune_config=tune_config,
                      run_config=run_config), False


def _ranked_value(result, metric: str, mode: str, scope: str) -> Optional[float]:
    if scope == "all":
        df = result.metrics_dataframe
        if df is None or metric not in df:
            return None
        vals = [float(v) for v in df[metric].tolist() if v is not None and math.isfinite(float(v))]
        return (min(vals) if mode == "min" else max(vals)) if vals else None
    v = (result.metrics or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def _outcome(cfg: Config, name: str, exp_dir: str, uri: str, exp_id: str, parent_run_id: str, results,
             resumed: bool) -> SweepOutcome:
    t = cfg.tune
    runs = child_runs(uri, exp_id, parent_run_id)
    rows: list[TrialRow] = []
    for r in results:
        m = r.metrics or {}
        tid = m.get("trial_id") or Path(r.path).name
        params = space.trial_overrides({k: v for k, v in (r.config or {}).items() if k in t.space})
        tcfg = trial_config(cfg, params, name, tid, cfg.train.storage_path)
        if r.error is not None:
            outcome = ERROR
        elif "epoch" not in m and tid not in runs:
            outcome = "not_run"     # never started (no MLflow run); a started trial stopped before
        else:                       # its first report is early_stopped, as its run says
            outcome = trial_outcome(m, tcfg.train.epochs, tcfg.train.max_steps)
        err = None
        if r.error is not None:
            lines = str(r.error).strip().splitlines()
            err = lines[-1] if lines else type(r.error).__name__
        run = runs.get(tid)
        rows.append(TrialRow(trial_id=tid, outcome=outcome, epochs=int(m.get("epoch", 0) or 0), params=params,
                             metric=_ranked_value(r, t.metric, t.mode, t.best_scope),
                             run_id=run.info.run_id if run else None, error=err))
    scored = [r for r in rows if r.metric is not None and r.outcome != ERROR]
    best = None
    if scored:
        best = (min if t.mode == "min" else max)(scored, key=lambda r: r.metric)
        best.best = True
    elif rows and all(r.outcome == ERROR for r in rows):
        raise DvsaError(f"sweep {name}: all {len(rows)} trials failed; first error: {rows[0].error}")
    return SweepOutcome(name=name, experiment_dir=exp_dir, tracking_uri=uri, parent_run_id=parent_run_id,
                        metric=t.metric, mode=t.mode, trials=rows, best=best, resumed=resumed)


def _report(cfg: Config, parent, outcome: SweepOutcome, sweep_dir: Path) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(outcome.trials, outcome.metric)
    summary = sweep_dir / "summary.txt"
    summary.write_text(table)
    outcome.summary = str(summary)
    (sweep_dir / "summary.json").write_text(json.dumps(table_rows(outcome.trials, outcome.metric), indent=2))
    counts = {k: sum(r.outcome == k for r in outcome.trials) for k in (FINISHED, EARLY_STOPPED, ERROR)}
    parent.log_metrics({"trials/total": len(outcome.trials), "trials/finished": counts[FINISHED],
                        "trials/early_stopped": counts[EARLY_STOPPED], "trials/error": counts[ERROR]}, step=0)
    parent.log_artifact(summary)
    parent.log_table(table_rows(outcome.trials, outcome.metric), "summary_table.json")
    best = outcome.best
    if best is not None:
        path = write_best_config(best_config(cfg, best.params), sweep_dir / "best_config.yaml", outcome.name,
                                 best, outcome.metric)
        outcome.best_config = str(path)
        parent.log_artifact(path)
        parent.log_metrics({f"best/{outcome.metric}": best.metric}, step=0)
        tags = {"dvsa.best_trial": best.trial_id, "dvsa.best_config": str(path)}
        if best.run_id:
            tags["dvsa.best_run_id"] = best.run_id
            tracking.RunLogger(outcome.tracking_uri, best.run_id).set_tags({BEST_TAG: "true"})
        parent.set_tags(tags)
    print(f"[{outcome.name}] sweep done ({'resumed' if outcome.resumed else 'new'}): {len(outcome.trials)} trials, "
          f"{counts[FINISHED]} finished, {counts[EARLY_STOPPED]} early-stopped, {counts[ERROR]} failed\n"
          f"{table}"
          + (f"  best: trial {best.trial_id} {outcome.metric} {best.metric:.4g}; config {outcome.best_config}\n"
             if best is not None else "  no trial reported the metric\n")
          + f"  MLflow parent run {outcome.parent_run_id} ({outcome.tracking_uri})", flush=True)
