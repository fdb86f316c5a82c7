"""Fault tolerance on a local Ray: a re-submitted job resumes from the last checkpoint (the step
count continues; it does not restart at zero). A killed worker node and a stopped + resubmitted
job on a two-node cluster: tests/test_cluster_rehearsal.py.

The job is the alignment model on the session's Karpathy shards (no METEOR JVM to start at each
of the four worker-group starts); the resume machinery is the loop both tasks share. Every step
count is derived from the shards' manifest, never from the run being checked.
"""

import json
import os
from pathlib import Path

import pytest
from run_checks import steps_per_epoch

from dvsa.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _attempts(progress: Path) -> list[dict]:
    f = progress / "attempts.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def test_progress_files_record_each_attempt_and_position(tmp_path):
    """What the test below (and an operator) reads: one attempts.jsonl line per start, and
    rank<R>.json rewritten in place with the worker's pid, step and epoch."""
    from dvsa.train.loop import Progress

    p = Progress(str(tmp_path / "progress"), rank=1)
    p.start(0, 0, resumed=False)
    p.update(3, 0)
    p.update(6, 1, checkpointed_step=6)
    p.start(6, 1, resumed=True)
    got = [{k: a[k] for k in ("rank", "pid", "start_step", "start_epoch", "resumed")}
           for a in _attempts(tmp_path / "progress")]
    assert got == [{"rank": 1, "pid": os.getpid(), "start_step": 0, "start_epoch": 0, "resumed": False},
                   {"rank": 1, "pid": os.getpid(), "start_step": 6, "start_epoch": 1, "resumed": True}]
    rank = json.loads((tmp_path / "progress" / "rank1.json").read_text())
    assert (rank["pid"], rank["step"], rank["epoch"]) == (os.getpid(), 6, 1)
    assert not list((tmp_path / "progress").glob("*.tmp"))
    Progress(None, 0).start(0, 0, False)                 # no directory: a no-op


@pytest.mark.ray
def test_rerun_resumes_from_the_last_checkpoint(ray_local, shards, tmp_path):
    """Re-submitting a finished job's train.name with more epochs continues from its last
    checkpoint into the same MLflow run; re-submitting it once more trains nothing and ends the run
    on that checkpoint's metrics. (A worker lost mid-run, a node lost with it, and a stopped job
    resubmitted, on a real two-node cluster: tests/test_cluster_rehearsal.py.)"""
    from dvsa.train.launch import train

    epochs = 2
    kp = shards / "kp"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"out={tmp_path}", f"data.shards={shards / 'vg'}", f"data.fullframe_shards={kp}",
        f"train.storage_path={tmp_path / 'ray_results'}", "task=align",
        "train.name=ft", f"train.epochs={epochs}", "data.max_val_images=6", "train.max_failures=2",
        "train.keep_checkpoints=2"])
    per_epoch = steps_per_epoch(kp, cfg.data.batch_size)       # 1 worker, full batches only
    assert per_epoch >= 2
    progress = tmp_path / "jobs" / "ft" / "progress"
    outcome = train(cfg, "align")
    assert outcome.epoch == epochs and outcome.step == epochs * per_epoch and not outcome.resumed
    first = _attempts(progress)
    assert [(a["start_step"], a["resumed"]) for a in first] == [(0, False)]

    from mlflow.tracking import MlflowClient

    c = MlflowClient(outcome.tracking_uri)
    val_steps = sorted({m.step for m in c.get_metric_history(outcome.run_id, "val/loss")})
    assert val_steps == [per_epoch * e for e in range(1, epochs + 1)]

    # re-submitting the same train.name with more epochs continues from the last checkpoint
    more = cfg.replace(**{"train.epochs": epochs + 1})
    again = train(more, "align")
    second = _attempts(progress)[-1]
    assert len(_attempts(progress)) == 2
    assert second["resumed"] and second["start_step"] == outcome.step and second["start_epoch"] == epochs
    assert again.step == (epochs + 1) * per_epoch and again.epoch == epochs + 1
    assert again.run_id == outcome.run_id and again.resumed      # the same MLflow run, reopened
    assert c.get_run(again.run_id).data.tags["dvsa.worker_starts"] == "2"
    assert c.get_run(again.run_id).data.tags["changed.train.epochs"] == str(epochs + 1)
    loss_steps = sorted({m.step for m in c.get_metric_history(outcome.run_id, "train/loss")})
    assert loss_steps == list(range(cfg.train.log_every, again.step + 1, cfg.train.log_every))
    starts = sorted((m.step, m.value) for m in c.get_metric_history(outcome.run_id, "train/worker_start"))
    assert starts == [(0, 1.0), (outcome.step, 2.0)]

    # and once more, already finished (as when a driver dies after the final checkpoint): nothing
    # trains, and the run ends on that checkpoint's metrics, not on none
    done = train(more, "align")
    third = _attempts(progress)[-1]
    assert len(_attempts(progress)) == 3 and third["resumed"] and third["start_step"] == again.step
    assert done.step == again.step and done.epoch == epochs + 1
    assert done.metrics["val/loss"] == pytest.approx(again.metrics["val/loss"])
    assert done.metrics["epoch"] == epochs + 1
