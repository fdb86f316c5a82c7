"""Whether the training workers can be placed, said before (local Ray) or instead of (cluster)
waiting forever.

Ray Train asks for ``train.num_workers`` bundles of ``{CPU: train.cpus_per_worker[, GPU:
train.gpus_per_worker]}``; the ingest's decode tasks need at least one more CPU beside them. On
an embedded (or reused) local Ray nothing will ever join, so a request that cannot fit is
refused before training (:func:`check_fits`). On a joined cluster an autoscaler may still add
nodes: the job waits ``train.start_timeout_s`` and then ends with a line naming what is
missing (:func:`startup_timeout_message`); Ray Train's own default would retry forever.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from dvsa.config import Config, ConfigError

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"   # Ray Train V2's per-attempt wait
INGEST_CPUS = 1.0                                              # one decode task at least


def worker_bundle(cfg: Config) -> dict[str, float]:
    """The resources of one training worker."""
    t = cfg.train
    bundle = {"CPU": float(t.cpus_per_worker)}
    if t.use_gpu:
        bundle["GPU"] = float(t.gpus_per_worker)
    return bundle


def needed(cfg: Config) -> dict[str, float]:
    """All the workers' resources, plus a CPU for the ingest."""
    total = {k: v * cfg.train.num_workers for k, v in worker_bundle(cfg).items()}
    total["CPU"] += INGEST_CPUS
    return total


def _shown(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU"))


def check_fits(cfg: Config, cluster: Mapping[str, float]) -> None:
    """ConfigError when a local Ray of ``cluster`` resources (``ray.cluster_resources()``) can
    never place the workers and one decode task."""
    want = needed(cfg)
    short = {k: v for k, v in want.items() if v > float(cluster.get(k, 0.0)) + 1e-9}
    if short:
        t = cfg.train
        per = " + ".join(f"{k} {v:g}" for k, v in worker_bundle(cfg).items())
        raise ConfigError(
            f"train.num_workers={t.num_workers} x ({per}) + CPU {INGEST_CPUS:g} for decoding needs "
            f"{_shown(want)}; this local Ray has {_shown(cluster) or 'none'} (ray.num_cpus/ray.num_gpus): "
            f"lower train.num_workers or train.cpus_per_worker, or join a cluster (ray.address)")


def set_start_timeout(cfg: Config) -> None:
    """How long Ray Train waits for the workers' placement group (``train.start_timeout_s``;
    0 keeps Ray's default wait, retried forever)."""
    if cfg.train.start_timeout_s > 0:
        os.environ[START_TIMEOUT_ENV] = f"{cfg.train.start_timeout_s:g}"


def startup_timeout_message(cfg: Config, nodes: Sequence[Mapping[str, float]], available: Mapping[str, float]) -> str:
    """The line a job that could not place its workers ends with; ``nodes``: each alive node's
    resources (a worker's bundle must fit on one node), ``available``: what is free now."""
    t = cfg.train
    per = ", ".join(f"{k} {v:g}" for k, v in worker_bundle(cfg).items())
    shown = " | ".join(_shown(n) or "nothing" for n in nodes) or "none"
    return (f"train.start_timeout_s={t.start_timeout_s:g}: the cluster could not place {t.num_workers} "
            f"worker(s) of {{{per}}} in time; its {len(nodes)} node(s) have {shown} "
            f"({_shown(available) or 'nothing'} free now). Add nodes (or let the autoscaler), lower "
            f"train.num_workers / train.cpus_per_worker / train.gpus_per_worker, or raise train.start_timeout_s")


def alive_node_resources() -> list[dict[str, float]]:
    """Each alive node's total resources (``ray.nodes()``; Ray must be initialised)."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
