"""A training job run in a daemon thread, so that a test can act on it (kill a worker, stop
the tracking server) while it runs."""

from __future__ import annotations

import threading


def train_in_thread(cfg, task: str) -> tuple[threading.Thread, dict]:
    """Start ``dvsa.train.launch.train(cfg, task)``; returns the thread and a dict that gets
    ``"outcome"`` when the job returns or ``"error"`` when it raises (for the test to assert)."""
    from dvsa.train.launch import train

    result: dict = {}

    def job():
        try:
            result["outcome"] = train(cfg, task)
        except BaseException as e:  # surfaced by the caller's assertions
            result["error"] = e

    th = threading.Thread(target=job, daemon=True)
    th.start()
    return th, result
