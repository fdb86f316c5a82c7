"""Every pass over a dataset at full width from its start, and each block handed on when it lands.

Two settings of Ray Data 2.60's streaming executor cost a dvsa pass (an epoch) time at its ends:

- **Limits refresh.** The resource manager learns how many CPUs it may use from the autoscaling
  coordinator. The coordinator's answer is fetched asynchronously and its cache is emptied when
  a pass ends, and the resource manager refreshes its limits only once a second
  (``ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = 1``): for the first second of every pass
  an operator may run one task, whatever the cluster has. On 2 CPUs and 4,800 images that cost
  13% of the pass (``benchmarks/ingest.py``, docs/ingest.md "Parity"). Refreshing every
  :data:`LIMITS_REFRESH_S` lets the second task start after ~0.1 s, and keeps the resource
  reservation (the object-store budget that bounds the queue of decoded blocks) as it is. Each
  refresh asks the coordinator actor for a cached dictionary entry, asynchronously.
  ``DVSA_RAY_DATA_LIMITS_REFRESH_S`` overrides the value (``1`` is Ray's own).
- **Block metadata fetched inline.** By default (``RAY_DATA_METADATA_PREFETCH_ON_THREAD``, on)
  the executor hands a finished block's metadata to a background thread and emits the block on
  its *next* scheduling step, which comes up to 0.1 s later (the loop's ``ray.wait`` timeout):
  the first block of every pass, and the last, wait one step more than they need. dvsa's read
  tasks emit a few large blocks (a decoded chunk of ``data.decode_batch_size`` images, a block's
  metadata a small object inlined in the task's report), so the executor reads the metadata
  inline (``ray.get`` of a local object) and emits the block in the step that sees it: the
  first batch comes ~0.1 s sooner (``benchmarks/ingest.py``, arm ``ray_pil_threaded_metadata``).
  A user who sets ``RAY_DATA_METADATA_PREFETCH_ON_THREAD`` keeps what they set.

Both are module or class attributes of the process that runs the streaming executor: the job
driver, or Ray Train's split coordinator actor. :mod:`dvsa.ingest.shard_source` (which every
such process imports to unpickle a dvsa dataset) applies them on import. A Ray whose internals
moved is left as it is.
"""

from __future__ import annotations

import logging
import math
import os

log = logging.getLogger(__name__)

LIMITS_REFRESH_S = 0.1
ENV = "DVSA_RAY_DATA_LIMITS_REFRESH_S"
#: Ray's own switch for the threaded metadata fetcher; set by a user, it is left alone
RAY_METADATA_ENV = "RAY_DATA_METADATA_PREFETCH_ON_THREAD"


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


def fetch_block_metadata_inline() -> bool | None:
    """Make the streaming executors this process starts emit each block in the step that sees
    it (Ray's inline metadata fetcher); return whether the threaded fetcher is on now (None:
    this Ray has no such switch)."""
    try:
        from ray.data._internal.execution import metadata_fetcher
    except ImportError:
        return None
    if not hasattr(metadata_fetcher, "_PREFETCH_ON_THREAD"):
        log.debug("ray.data has no _PREFETCH_ON_THREAD: left as it is")
        return None
    if RAY_METADATA_ENV not in os.environ:  # else Ray read the user's choice on import
        metadata_fetcher._PREFETCH_ON_THREAD = False
    return bool(metadata_fetcher._PREFETCH_ON_THREAD)


def tune_ray_data() -> None:
    """Both settings (module docstring), for the process that runs a dvsa dataset."""
    refresh_limits_often()
    fetch_block_metadata_inline()
