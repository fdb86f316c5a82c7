"""User-facing errors: the ``dvsa`` command prints these as one line, without a traceback."""

from __future__ import annotations

from typing import Iterable


class DvsaError(Exception):
    """A problem the user can fix (bad input file, missing Java, bad checkpoint path...)."""


class DataError(DvsaError):
    """Input data that cannot be read: names the file and, where known, the position."""


def first_few(items: Iterable[object], limit: int = 5) -> str:
    """``'a', 'b', 'c' and 995 more``: what an error message lists of a long collection, so
    that a message stays one short line however many items are wrong."""
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


_terminated = False


def was_terminated() -> bool:
    """Whether SIGTERM arrived (code that catches KeyboardInterrupt and raises a new one, as
    ``ray.get`` does, loses the :class:`Terminated` type; this flag keeps the cause)."""
    return _terminated


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``ray job stop``, a preempted node) raised where Ctrl-C would be, so
    that a job unwinds the same way: its MLflow run ends KILLED and Ray is shut down."""


def raise_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` in this process (main thread only; ``ray.init``
    installs its own handler, so :func:`dvsa.runtime.ray_session` calls this again after it)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        global _terminated
        _terminated = True
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
