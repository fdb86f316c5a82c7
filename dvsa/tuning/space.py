"""A sweep's search space, searcher, scheduler and trial resources, from the config's ``tune``
section, checked before any Ray work.

``tune.space`` maps a dotted config key to one of::

    {uniform: [low, high]}      float in [low, high]       (an int key: integers low..high)
    {loguniform: [low, high]}   log-uniform in [low, high] (an int key: integers low..high)
    {randint: [low, high]}      integer in low..high, both ends included
    {choice: [a, b, ...]}       one of the values (with ``tune.search: grid``: every value)
    {grid: [a, b, ...]}         every value, crossed with the other grid keys

``tune.search``: ``random`` (Tune's variant generator; grid keys are crossed, num_samples
repeats), ``grid`` (choice/grid keys only), ``optuna`` (TPE; no grid keys).
``tune.scheduler``: ``asha`` stops trials whose validation metric trails at the rungs
``grace_period * reduction_factor**k`` epochs (``time_attr="epoch"``, ``max_t=train.epochs``);
``fifo`` runs every trial to the end.
"""

from __future__ import annotations

import math
import typing
from typing import Any

from dvsa.config import Config, ConfigError
from dvsa.evaluation.captions import METRICS
from dvsa.evaluation.retrieval import KS

# keys a sweep owns itself, or that would make trials write over each other
FORBIDDEN_PREFIXES = ("tune.", "mlflow.", "ray.")
FORBIDDEN_KEYS = {"task", "name", "out", "train.name", "train.storage_path", "train.use_gpu",
                  "train.cpus_per_worker", "train.gpus_per_worker", "train.val_every", "data.shards",
                  "data.fullframe_shards", "data.features"}
# Ray Data's read and map_batches tasks ask 1 CPU each: keep one free so trials never starve them
DATA_CPU_RESERVE = 1.0


def key_type(key: str) -> type:
    """The Python type of a dotted config key (``Optional[X]`` -> X; ``Literal`` -> its values' type)."""
    cls: Any = Config
    parts = key.split(".")
    for p in parts:
        tp = typing.get_type_hints(cls)[p]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is typing.Union and args:
            tp = args[0]
        cls = tp
    if typing.get_origin(cls) is typing.Literal:
        return type(typing.get_args(cls)[0])
    return cls


def check_sweep(cfg: Config) -> None:
    """Everything about ``tune`` that can be refused before Ray starts (one-line ConfigError)."""
    t = cfg.tune
    if not t.space:
        raise ConfigError("tune.space: empty, nothing to sweep "
                          "(e.g. tune.space: {train.lr: {loguniform: [1e-4, 1e-2]}})")
    for key, spec in t.space.items():
        where = f"tune.space.{key}"
        if key in FORBIDDEN_KEYS or key.startswith(FORBIDDEN_PREFIXES):
            raise ConfigError(f"{where}: {key} is set by the sweep itself and cannot be searched")
        kind = next(iter(spec))
        if t.search == "optuna" and kind == "grid":
            raise ConfigError(f"{where}: grid is not supported with tune.search=optuna (use choice)")
        if t.search == "grid" and kind not in ("grid", "choice"):
            raise ConfigError(f"{where}: tune.search=grid needs grid or choice values, got {kind}")
    reported = reported_metrics(cfg.task)
    if t.metric not in reported:
        raise ConfigError(f"tune.metric: {t.metric!r} is not a metric task={cfg.task} reports every epoch "
                          f"(one of: {', '.join(reported)})")
    if t.mode != reported[t.metric]:
        better = "larger" if reported[t.metric] == "max" else "smaller"
        raise ConfigError(f"tune.mode: {t.metric} is better {better}: use tune.mode={reported[t.metric]}")
    if cfg.train.use_gpu and t.gpus_per_trial <= 0:
        raise ConfigError("tune.gpus_per_trial: 0, but train.use_gpu is true: give each trial GPUs "
                          "(e.g. tune.gpus_per_trial=1, or 0.25 for four single-worker trials per GPU) "
                          "or set train.use_gpu=false")
    if t.scheduler == "asha" and t.grace_period > cfg.train.epochs:
        raise ConfigError(f"tune.grace_period: {t.grace_period} epochs is more than train.epochs={cfg.train.epochs}")


def reported_metrics(task: str) -> dict[str, str]:
    """``{metric: "min" | "max"}``: what a ``task`` training run reports every epoch (what a
    sweep can rank trials by, and which way is better)."""
    out = {"val/loss": "min", "train/epoch_loss": "min"}
    if task == "align":
        out["val/rsum"] = "max"
        for d in ("i2t", "t2i"):
            out.update({f"val/{d}_r{k}": "max" for k in KS})
            out[f"val/{d}_medr"] = "min"
    else:
        out.update({f"val/{m}": "max" for m in METRICS})
    return out


def _plain(v: Any) -> Any:
    """numpy scalars (what samplers return) -> Python scalars the config accepts."""
    return v.item() if hasattr(v, "item") and not isinstance(v, (list, dict, str)) else v


def param_space(cfg: Config) -> dict:
    """``{dotted key: Tune domain or grid_search}`` for ``tune.Tuner(param_space=...)``."""
    from ray import tune

    out: dict = {}
    for key, spec in cfg.tune.space.items():
        kind, args = next(iter(spec.items()))
        is_int = key_type(key) is int
        if kind == "grid" or (kind == "choice" and cfg.tune.search == "grid"):
            out[key] = tune.grid_search(list(args))
        elif kind == "choice":
            out[key] = tune.choice(list(args))
        elif kind == "randint" or (kind == "uniform" and is_int):
            out[key] = tune.randint(int(math.ceil(args[0])), int(math.floor(args[1])) + 1)
        elif kind == "loguniform" and is_int:
            out[key] = tune.lograndint(int(math.ceil(args[0])), int(math.floor(args[1])) + 1)
        elif kind == "loguniform":
            out[key] = tune.loguniform(float(args[0]), float(args[1]))
        else:
            out[key] = tune.uniform(float(args[0]), float(args[1]))
    return out


def grid_size(cfg: Config) -> int:
    """Trials per sample: the product of the grid keys' lengths (1 without grid keys)."""
    n = 1
    for spec in cfg.tune.space.values():
        kind, args = next(iter(spec.items()))
        if kind == "grid" or (kind == "choice" and cfg.tune.search == "grid"):
            n *= len(args)
    return n


def expected_trials(cfg: Config) -> int:
    return cfg.tune.num_samples * (1 if cfg.tune.search == "optuna" else grid_size(cfg))


def trial_overrides(params: dict) -> dict:
    """A trial's sampled ``{key: value}`` as plain Python values."""
    return {k: _plain(v) for k, v in params.items()}


def apply_params(base: Config, params: dict) -> Config:
    """``base`` with the trial's sampled values; a value the config refuses is a ConfigError."""
    return base.replace(**trial_overrides(params))


def searcher(cfg: Config):
    """None (Tune's random/grid variant generator) or an OptunaSearch with a seeded TPE sampler."""
    if cfg.tune.search != "optuna":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.train.seed))


def scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)


def trial_resources(cfg: Config) -> dict:
    """What Tune reserves for a trial's own function: ``{"cpu": tune.driver_cpus}``. The trial's
    TorchTrainer reserves its workers itself (``tune.cpus_per_trial``/``gpus_per_trial``)."""
    return {"cpu": cfg.tune.driver_cpus}


def worker_settings(cfg: Config) -> dict:
    """``train.*`` overrides that give one trial's workers ``tune.cpus_per_trial`` CPUs and
    ``tune.gpus_per_trial`` GPUs in all (fractions allowed: 0.25 GPU = 4 trials per GPU)."""
    n = cfg.train.num_workers
    out = {"train.cpus_per_worker": cfg.tune.cpus_per_trial / n}
    if cfg.tune.gpus_per_trial > 0:
        out.update({"train.use_gpu": True, "train.gpus_per_worker": cfg.tune.gpus_per_trial / n})
    else:
        out["train.use_gpu"] = False
    return out


def trials_that_fit(cfg: Config, cluster: dict) -> int:
    """How many trials' workers ``cluster`` (``ray.cluster_resources()``) can hold at once, with
    ``DATA_CPU_RESERVE`` CPUs kept for Ray Data's tasks."""
    t = cfg.tune
    per_trial = t.driver_cpus + t.cpus_per_trial
    fit = math.floor((float(cluster.get("CPU", 0.0)) - DATA_CPU_RESERVE) / per_trial + 1e-9)
    if t.gpus_per_trial > 0:
        fit = min(fit, math.floor(float(cluster.get("GPU", 0.0)) / t.gpus_per_trial + 1e-9))
    return max(0, fit)


def max_concurrent(cfg: Config, cluster: dict, elastic: bool = False) -> int:
    """Trials to run at once: ``tune.max_concurrent_trials``, capped to what ``cluster`` holds.

    Tune only sees the trial function's own CPUs, not its TorchTrainer's workers: on a fixed
    cluster (the embedded local Ray) trials beyond what fits would only wait for resources that
    never come, so the cap applies, and a cluster too small for one trial is a ConfigError.
    ``elastic`` (a cluster the job joined, which may autoscale: ``ray_cluster.yaml``'s GPU
    workers start at 0): no cap; the trials that do not fit yet wait for the autoscaler (Ray
    Train retries a worker group that cannot be placed).
    """
    t = cfg.tune
    if elastic:
        return t.max_concurrent_trials
    fit = trials_that_fit(cfg, cluster)
    if fit < 1:
        gpu = f" and {t.gpus_per_trial} GPU" if t.gpus_per_trial > 0 else ""
        raise ConfigError(
            f"tune.cpus_per_trial: a trial needs {t.driver_cpus + t.cpus_per_trial:g} CPUs (tune.driver_cpus + "
            f"tune.cpus_per_trial){gpu}, plus {DATA_CPU_RESERVE:g} CPU kept for Ray Data, but the cluster has "
            f"{float(cluster.get('CPU', 0.0)):g} CPUs and {float(cluster.get('GPU', 0.0)):g} GPUs")
    return max(1, min(t.max_concurrent_trials, fit))
