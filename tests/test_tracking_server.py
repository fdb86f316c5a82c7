"""MLflow as on a cluster: a tracking server over PostgreSQL (tests/tracking_server.py), the
artifacts on a directory standing for the shared volume. A training job logs into it over HTTP
and survives the server going away mid-run (the metrics logged meanwhile arrive); an
evaluation finds the run by its id through ``MLFLOW_TRACKING_URI``; PostgreSQL, not any SQLite
file, holds what was logged."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest
from background import train_in_thread
from mlflow.tracking import MlflowClient
from tracking_server import TrackingServer, have_postgres

from dvsa.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server():
    if not have_postgres():
        pytest.fail("PostgreSQL 15 (initdb, pg_ctl, postgres) is needed: apt-get install postgresql (.ci/run does)")
    root = Path(tempfile.mkdtemp(prefix="dvsa-ts-", dir="/tmp"))
    os.chmod(root, 0o755)                 # the postgres user (PostgreSQL refuses root) must reach pg/
    srv = TrackingServer(root)
    try:
        yield srv.start()
    finally:
        srv.stop()


def _step(progress: Path) -> int:
    try:
        return int(json.loads((progress / "rank0.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def test_training_logs_over_http_into_postgres_through_a_server_outage(ray_local, server, shards, tmp_path,
                                                                       monkeypatch, capsys):
    from dvsa.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"out={out}", f"data.shards={shards / 'kp'}", f"data.fullframe_shards={shards / 'kp'}", "task=align",
        f"train.storage_path={tmp_path / 'shared' / 'ray_results'}", f"mlflow.tracking_uri={server.uri}",
        "train.name=served", "train.epochs=4", "train.log_every=1", "data.max_val_images=6",
        "mlflow.experiment=served"])
    progress = out / "jobs" / "served" / "progress"
    th, result = train_in_thread(cfg, "align")
    deadline = time.time() + 300
    while time.time() < deadline and th.is_alive() and _step(progress) < 2:
        time.sleep(0.2)
    assert th.is_alive() and _step(progress) >= 2, result
    server.stop_mlflow()                       # the server goes away mid-run...
    down_at = _step(progress)
    time.sleep(5)
    server.start_mlflow(timeout_s=300)         # ... and comes back
    th.join(600)
    assert not th.is_alive() and "error" not in result, result.get("error")
    outcome = result["outcome"]
    assert outcome.step > down_at

    c = MlflowClient(server.uri)
    run = c.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "4" and run.data.tags["task"] == "align"
    # every step's loss arrived, those logged while the server was down included; nothing dropped
    steps = sorted(m.step for m in c.get_metric_history(outcome.run_id, "train/loss"))
    assert steps == list(range(1, outcome.step + 1))
    assert "mlflow/dropped_metrics" not in run.data.metrics
    assert run.data.tags["dvsa.checkpoint"] == outcome.checkpoint
    assert outcome.checkpoint.startswith(str(tmp_path / "shared" / "ray_results" / "served"))
    # the artifacts are on the shared artifact root, served by the server
    arts = {f.path for f in c.list_artifacts(outcome.run_id)}
    arts |= {f.path for f in c.list_artifacts(outcome.run_id, "plots")}
    assert {"checkpoint.json", "config.yaml", "vocab.json", "plots/loss_curves.png"} <= arts
    assert list(server.artifacts.rglob("loss_curves.png"))
    # PostgreSQL holds them, and no SQLite store was made anywhere
    (n,) = server.query("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss'", outcome.run_id)[0]
    assert n == outcome.step
    assert server.query("SELECT value FROM params WHERE run_uuid = %s AND key = 'train.name'",
                        outcome.run_id) == [("served",)]
    assert not list(tmp_path.rglob("*.db"))

    # evaluating by run id: MLFLOW_TRACKING_URI finds the run; its metrics land in PostgreSQL
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", outcome.run_id, f"out={out}"]) == 0, capsys.readouterr().err[-3000:]
    metrics = c.get_run(outcome.run_id).data.metrics
    assert any(k.startswith("retrieval/") for k in metrics), sorted(metrics)
    rows = server.query("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key LIKE 'retrieval/%%'",
                        outcome.run_id)
    assert rows[0][0] > 0
    assert not list(tmp_path.rglob("*.db"))
