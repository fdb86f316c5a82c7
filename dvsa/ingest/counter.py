"""Skipped samples, counted by reason across every ``map_batches`` worker.

A sample that cannot make a row (undecodable JPEG, no usable caption for the task, a json
that does not parse) is dropped from the batch and counted here, never silently lost. The
counts live in one small Ray actor owned by the process that built the dataset (the job
driver), on that process's node; workers add to it (waiting for the ack, so a delivered batch's skips are counted), the
driver reads it (``counts()``) after an epoch and logs it. Counts are cumulative over every
pass over the data: a corrupt image is counted once per epoch. A training job's splits share
one actor, each counting under its own scope (:meth:`SkipCounter.scoped`): one process fewer
per job to start.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping

log = logging.getLogger(__name__)


class _SkipCounts:
    """``{scope: {reason: n}}`` and the first example per scope and reason."""

    def __init__(self):
        self._counts: dict[str, Counter] = {}
        self._examples: dict[str, dict[str, str]] = {}

    def add(self, scope: str, counts: Mapping[str, int], examples: Mapping[str, str]) -> None:
        self._counts.setdefault(scope, Counter()).update(counts)
        seen = self._examples.setdefault(scope, {})
        for reason, example in examples.items():
            seen.setdefault(reason, example)

    def counts(self, scope: str) -> dict[str, int]:
        return dict(self._counts.get(scope, {}))

    def examples(self, scope: str) -> dict[str, str]:
        return dict(self._examples.get(scope, {}))


_ACTOR_CLASS = None


def _actor_class():
    """``_SkipCounts`` as a Ray actor class, made on first use (so that importing the ingest
    package, e.g. for ``BatchBuilder`` alone, does not need Ray)."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(num_cpus=0)(_SkipCounts)
    return _ACTOR_CLASS


def _on_this_node():
    """The counting actor on the node of the process that makes it (the job driver, or a Tune
    trial's function): it then shares that process's fate. Placed anywhere, it could land on a
    worker node, and losing that node would kill it while the job goes on: every restarted
    worker group would then fail reading it (seen in tests/test_cluster_rehearsal.py)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return _actor_class().options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


class SkipCounter:
    """A handle to the counting actor; picklable, so ``map_batches`` workers can hold it.

    ``SkipCounter()`` starts an actor; ``counter.scoped("val")`` is a handle to the same actor
    that counts apart (a job's train and val splits)."""

    def __init__(self, actor=None, scope: str = ""):
        self._actor = actor if actor is not None else _on_this_node()
        self._scope = scope

    def scoped(self, scope: str) -> "SkipCounter":
        """A handle on the same actor whose counts are kept apart under ``scope``."""
        return SkipCounter(self._actor, scope)

    def add(self, counts: Mapping[str, int], examples: Mapping[str, str] | None = None) -> None:
        """Add ``{reason: n}``; ``examples``: ``{reason: "key: detail"}``. Waits for the actor
        (skips are rare), so counts are complete once the batch they came from is delivered."""
        counts = {k: int(v) for k, v in counts.items() if v}
        if counts:
            import ray

            ray.get(self._actor.add.remote(self._scope, counts, dict(examples or {})))

    def counts(self) -> dict[str, int]:
        """``{reason: n}`` so far (e.g. ``{"corrupt_image": 1, "no_region_caption": 3}``)."""
        import ray

        return ray.get(self._actor.counts.remote(self._scope))

    def examples(self) -> dict[str, str]:
        """The first ``"key (shard): detail"`` seen per reason, to find the bad input."""
        import ray

        return ray.get(self._actor.examples.remote(self._scope))

    def total(self) -> int:
        return sum(self.counts().values())

    def log(self, prefix: str = "ingest") -> dict[str, int]:
        """Log the counts (warning when any sample was skipped) and return them."""
        counts = self.counts()
        if counts:
            ex = self.examples()
            log.warning("%s: skipped %d samples: %s (first: %s)", prefix, sum(counts.values()),
                        ", ".join(f"{k}={v}" for k, v in sorted(counts.items())),
                        "; ".join(f"{k}: {v}" for k, v in sorted(ex.items())))
        return counts
