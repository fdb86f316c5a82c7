"""Every pass over a dataset at full width from its start, not after Ray Data's first second.

Ray Data 2.60's resource manager learns how many CPUs it may use from the autoscaling
coordinator. The coordinator's answer is fetched asynchronously and its cache is emptied when a
pass ends, and the resource manager refreshes its limits only once a second
(``ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = 1``): for the first second of every pass
(every epoch) an operator may run one task, whatever the cluster has. On 2 CPUs and 4,800
images that costs 13% of the pass (``benchmarks/ingest.py``, arm ``ray_pil_no_reservation``,
docs/ingest.md "Parity"). Refreshing every :data:`LIMITS_REFRESH_S` lets the second task start
after ~0.1 s, and keeps the resource reservation (the object-store budget that bounds the
queue of decoded blocks) as it is. Each refresh asks the coordinator actor for a cached
dictionary entry, asynchronously.

The setting is a class attribute of the process that runs the streaming executor: the job
driver, or Ray Train's split coordinator actor. :mod:`dvsa.ingest.shard_source` (which every
such process imports to unpickle a dvsa dataset) applies it on import. The environment
variable ``DVSA_RAY_DATA_LIMITS_REFRESH_S`` overrides the value (``1`` is Ray's own); a Ray
without the attribute is left as it is.
"""

from __future__ import annotations

import logging
import math
import os

log = logging.getLogger(__name__)

LIMITS_REFRESH_S = 0.1
ENV = "DVSA_RAY_DATA_LIMITS_REFRESH_S"


def refresh_limits_often() -> float | None:
    """Set Ray Data's global-limits refresh interval; return the value set (None: not set)."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:                      # a Ray whose internals moved: nothing to tune
        return None
    if not hasattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S"):
        log.debug("ray.data ResourceManager has no GLOBAL_LIMITS_UPDATE_INTERVAL_S: left as it is")
        return None
    raw = os.environ.get(ENV)
    try:
        value = float(raw) if raw else LIMITS_REFRESH_S
    except ValueError:
        value = float("nan")
    if not (0 < value < math.inf):          # limits never refreshed would stay at zero CPUs
        log.warning("%s=%r is not a positive number of seconds: using %s", ENV, raw, LIMITS_REFRESH_S)
        value = LIMITS_REFRESH_S
    ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = value
    return value
