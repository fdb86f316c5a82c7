"""Every pass over a dataset at full width from its start, and each block handed on when it lands.

Three behaviours of Ray Data 2.60's streaming executor cost a dvsa pass (an epoch) time at its
ends, or CPU all along:

- **The first answer of a pass.** Ray Data's client of the autoscaling coordinator is
  non-blocking (ray-project/ray#62725): each call sends a request and returns the answer cached
  from the one before. A pass registers with the coordinator as it starts, but its first limits
  refresh gets the empty cache, so the executor's first step sees zero CPUs and starts one task;
  the second waits for the next step, ~0.1 s later. dvsa's client waits for that first answer
  (the coordinator is a local actor call, ~3 ms here) for up to :data:`FIRST_ANSWER_WAIT_S`,
  once per pass, so the first step starts every task the cluster has room for
  (:func:`await_first_reservation`).
- **Limits refresh.** The resource manager learns how many CPUs it may use from the autoscaling
  coordinator, and refreshes its limits only once a second
  (``ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = 1``); the client's cache is emptied
  when a pass ends. Had the first answer not come (above), the first second of every pass
  would run one task whatever the cluster has: on 2 CPUs and 4,800 images that cost 13% of the
  pass (``benchmarks/ingest.py``, docs/ingest.md "Parity"). While a pass's limits are unknown
  (zero CPUs and zero object-store memory) dvsa refreshes them every :data:`LIMITS_REFRESH_S`,
  and keeps the resource reservation (the object-store budget that bounds the queue of decoded
  blocks) as it is. Each refresh is an actor call, ~1 ms of the driver's CPU and more in the
  actor and raylet (50 calls in a 5 s pass at 0.1 s), so once the limits are known Ray's own
  interval (1 s, which follows an autoscaling cluster) applies again (:class:`RefreshInterval`).
  ``DVSA_RAY_DATA_LIMITS_REFRESH_S`` overrides the short interval (``1``: Ray's behaviour).
- **Block metadata fetched inline.** By default (``RAY_DATA_METADATA_PREFETCH_ON_THREAD``, on)
  the executor hands a finished block's metadata to a background thread and emits the block on
  its *next* scheduling step, which comes up to 0.1 s later (the loop's ``ray.wait`` timeout):
  the first block of every pass, and the last, wait one step more than they need. dvsa's read
  tasks emit a few large blocks (a decoded chunk of ``data.decode_batch_size`` images, a block's
  metadata a small object inlined in the task's report), so the executor reads the metadata
  inline (``ray.get`` of a local object) and emits the block in the step that sees it: the
  first batch comes ~0.1 s sooner (``benchmarks/ingest.py``, arm ``ray_pil_threaded_metadata``).
  A user who sets ``RAY_DATA_METADATA_PREFETCH_ON_THREAD`` keeps what they set.

All three are module or class attributes of the process that runs the streaming executor: the job
driver, or Ray Train's split coordinator actor. :mod:`dvsa.ingest.shard_source` (which every
such process imports to unpickle a dvsa dataset) applies them on import. A Ray whose internals
moved is left as it is.
"""

from __future__ import annotations

import logging
import math
import os
import time

log = logging.getLogger(__name__)

LIMITS_REFRESH_S = 0.1
#: the longest a pass's first limits refresh waits for the coordinator's answer: the executor
#: loop's own step (``ray.wait`` timeout), beyond which waiting never pays
FIRST_ANSWER_WAIT_S = 0.1
ENV = "DVSA_RAY_DATA_LIMITS_REFRESH_S"
#: Ray's own switch for the threaded metadata fetcher; set by a user, it is left alone
RAY_METADATA_ENV = "RAY_DATA_METADATA_PREFETCH_ON_THREAD"


class RefreshInterval:
    """``ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S`` as a descriptor: ``fast`` seconds for
    a resource manager whose limits are still unknown (zero CPUs and zero object-store memory:
    the coordinator has not answered yet), ``slow`` (Ray's own) once they are known. The
    resource manager reads it as ``self.GLOBAL_LIMITS_UPDATE_INTERVAL_S``."""

    def __init__(self, fast: float, slow: float):
        self.fast, self.slow = float(fast), float(slow)

    def for_limits(self, limits) -> float:
        """The interval for a manager holding ``limits`` (an ``ExecutionResources``)."""
        unknown = not getattr(limits, "cpu", 0) and not getattr(limits, "object_store_memory", 0)
        return self.fast if unknown else self.slow

    def __get__(self, manager, owner=None):
        if manager is None:                  # read on the class: the descriptor itself
            return self
        return self.for_limits(getattr(manager, "_global_limits", None))

    def __repr__(self) -> str:
        return f"RefreshInterval(fast={self.fast}, slow={self.slow})"


def refresh_limits_often() -> RefreshInterval | None:
    """Make Ray Data's resource managers refresh their global limits every
    :data:`LIMITS_REFRESH_S` (or ``$DVSA_RAY_DATA_LIMITS_REFRESH_S``) seconds until they are
    known, and at Ray's own interval after; return the interval set (None: not set)."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:                      # a Ray whose internals moved: nothing to tune
        return None
    current = ResourceManager.__dict__.get("GLOBAL_LIMITS_UPDATE_INTERVAL_S")
    if current is None:
        log.debug("ray.data ResourceManager has no GLOBAL_LIMITS_UPDATE_INTERVAL_S: left as it is")
        return None
    slow = current.slow if isinstance(current, RefreshInterval) else float(current)
    raw = os.environ.get(ENV)
    try:
        value = float(raw) if raw else LIMITS_REFRESH_S
    except ValueError:
        value = float("nan")
    if not (0 < value < math.inf):          # limits never refreshed would stay at zero CPUs
        log.warning("%s=%r is not a positive number of seconds: using %s", ENV, raw, LIMITS_REFRESH_S)
        value = LIMITS_REFRESH_S
    interval = RefreshInterval(fast=value, slow=slow)
    ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = interval
    return interval


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


def await_first_reservation() -> bool:
    """Make Ray Data's coordinator client wait up to :data:`FIRST_ANSWER_WAIT_S` (read at each
    pass; 0: never) for its first answer of a pass (module docstring) instead of returning the
    empty cache; return whether it is patched now (False: this Ray has no such client)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            DefaultAutoscalingCoordinator as Client,
        )
    except ImportError:
        return False
    get, cancel = Client.__dict__.get("get_reserved_resources"), Client.__dict__.get("cancel_request")
    if get is None or cancel is None:
        log.debug("ray.data's coordinator client has no get_reserved_resources/cancel_request: left as it is")
        return False
    if getattr(get, "dvsa_awaits_first", False):
        return True

    def get_reserved_resources(self, *args, **kwargs):
        answer = get(self, *args, **kwargs)
        if answer or FIRST_ANSWER_WAIT_S <= 0 or getattr(self, "_dvsa_awaited", False):
            return answer
        self._dvsa_awaited = True           # once per pass: a cluster with nothing to give waits once
        import ray

        # an answer may still be empty (nothing reserved for this pass yet): ask again until
        # one is not, or the time is up
        deadline = time.monotonic() + FIRST_ANSWER_WAIT_S
        while not answer:
            pending, left = getattr(self, "_pending_reserved_resources", None), deadline - time.monotonic()
            if pending is None or left <= 0 or not ray.wait([pending], timeout=left)[0]:
                break
            answer = get(self, *args, **kwargs)   # the ready answer, into the cache (and the next question sent)
        return answer

    def cancel_request(self, *args, **kwargs):
        self._dvsa_awaited = False          # the pass ended: Ray empties the cache, the next pass waits again
        return cancel(self, *args, **kwargs)

    get_reserved_resources.dvsa_awaits_first = True   # type: ignore[attr-defined]
    Client.get_reserved_resources = get_reserved_resources
    Client.cancel_request = cancel_request
    return True


def tune_ray_data() -> None:
    """The three settings (module docstring), for the process that runs a dvsa dataset."""
    refresh_limits_often()
    fetch_block_metadata_inline()
    await_first_reservation()
