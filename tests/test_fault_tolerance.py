"""Fault tolerance on a local Ray: a SIGKILLed training worker and a re-submitted job both resume
from the last checkpoint (the step count continues; it does not restart at zero)."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from dvsa.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def vg_shards(synth_world, tmp_path_factory):
    from dvsa.data.prepare import PrepareOptions, VGSource, prepare_vg

    out = tmp_path_factory.mktemp("ft_shards") / "vg"
    prepare_vg(VGSource(str(synth_world / "vg"), split_file=str(synth_world / "vg" / "densecap_splits.json"),
                        min_count=2), str(out), PrepareOptions(use_ray=False, progress=False))
    return out


def _attempts(progress: Path) -> list[dict]:
    f = progress / "attempts.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def _rank0(progress: Path) -> dict:
    try:
        return json.loads((progress / "rank0.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _registered_steps(snapshot: Path) -> list[int]:
    try:
        snap = json.loads(snapshot.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [int(r["metrics"]["step"]) for r in snap.get("checkpoint_results", [])]


def test_killed_worker_resumes_from_checkpoint_and_rerun_resumes(ray_local, vg_shards, tmp_path):
    from dvsa.train.launch import train

    epochs = 4
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"out={tmp_path}", f"data.shards={vg_shards}", f"train.storage_path={tmp_path / 'ray_results'}",
        "train.name=ft", f"train.epochs={epochs}", "data.max_val_images=6", "train.max_failures=2",
        "train.keep_checkpoints=2"])
    progress = tmp_path / "jobs" / "ft" / "progress"
    result: dict = {}

    def job():
        try:
            result["outcome"] = train(cfg, "caption")
        except BaseException as e:  # surfaced by the assertions below
            result["error"] = e

    th = threading.Thread(target=job, daemon=True)
    th.start()
    # wait until the controller has *registered* a checkpoint (its snapshot file lists it; a
    # checkpoint reported but not yet registered would be lost), then SIGKILL the worker
    snapshot = tmp_path / "ray_results" / "ft" / "checkpoint_manager_snapshot.json"
    killed = None
    deadline = time.time() + 400
    while time.time() < deadline and th.is_alive():
        registered = _registered_steps(snapshot)
        if registered:
            r = _rank0(progress)
            if r.get("epoch", epochs) < epochs - 1:
                killed = r
                os.kill(r["pid"], signal.SIGKILL)
            break
        time.sleep(0.1)
    assert killed is not None, f"never saw a checkpoint before the run ended: {result}"
    th.join(600)
    assert not th.is_alive() and "error" not in result, result.get("error")
    outcome = result["outcome"]
    attempts = _attempts(progress)
    assert len(attempts) == 2, attempts
    first, second = attempts
    assert first["start_step"] == 0 and not first["resumed"]
    assert second["resumed"] and second["pid"] != first["pid"]
    # resumed from a registered checkpoint: an epoch boundary > 0, at most the killed position
    steps_per_epoch = second["start_step"] // second["start_epoch"]
    assert second["start_epoch"] >= 1 and second["start_step"] == second["start_epoch"] * steps_per_epoch
    assert second["start_step"] <= killed["step"] and second["start_step"] >= max(registered)
    assert outcome.epoch == epochs and outcome.step == epochs * steps_per_epoch

    # MLflow: one run; train/loss reaches the last step; every epoch has a val/loss
    from mlflow.tracking import MlflowClient

    c = MlflowClient(outcome.tracking_uri)
    val_steps = sorted({m.step for m in c.get_metric_history(outcome.run_id, "val/loss")})
    assert val_steps == [steps_per_epoch * e for e in range(1, epochs + 1)]

    # re-submitting the same train.name with more epochs continues from the last checkpoint
    more = cfg.replace(**{"train.epochs": epochs + 1})
    again = train(more, "caption")
    third = _attempts(progress)[-1]
    assert len(_attempts(progress)) == 3
    assert third["resumed"] and third["start_step"] == outcome.step and third["start_epoch"] == epochs
    assert again.step == (epochs + 1) * steps_per_epoch and again.epoch == epochs + 1
    assert again.run_id == outcome.run_id and again.resumed      # the same MLflow run, reopened
    assert c.get_run(again.run_id).data.tags["changed.train.epochs"] == str(epochs + 1)

    # and once more, already finished (as when a driver dies after the final checkpoint): nothing
    # trains, and the run ends on that checkpoint's metrics, not on none
    done = train(more, "caption")
    fourth = _attempts(progress)[-1]
    assert len(_attempts(progress)) == 4 and fourth["resumed"] and fourth["start_step"] == again.step
    assert done.step == again.step and done.epoch == epochs + 1
    assert done.metrics["val/loss"] == pytest.approx(again.metrics["val/loss"])
    assert done.metrics["epoch"] == epochs + 1
