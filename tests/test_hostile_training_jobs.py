"""Training jobs on bad data and bad requests, end to end on Ray: corrupt JPEGs in a train shard
are skipped and logged per epoch in MLflow (or stop the job past ``data.max_skip_fraction``), a
request that cannot fit the local Ray is refused, and SIGTERM ends the MLflow run KILLED."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dvsa.config import ConfigError, load_config
from dvsa.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _cfg(kp: Path, out: Path, *overrides: str):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"out={out}", f"data.shards={kp}", f"data.fullframe_shards={kp}", "task=align",
        f"train.storage_path={out / 'ray_results'}", f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        "data.max_val_images=6", "train.log_every=1", *overrides])


def _with_corrupt_jpegs(src: Path, dst: Path, n: int) -> tuple[int, list[str]]:
    """A copy of the shard set ``src`` whose first ``n`` train samples have a broken JPEG (the
    manifest updated to the rewritten shard's size and checksum). Returns the train image count
    and the broken keys."""
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("train-*.tar"))[0]
    members = []
    with tarfile.open(shard) as t:
        for m in t.getmembers():
            members.append((m.name, t.extractfile(m).read()))
    broken: list[str] = []
    with tarfile.open(shard, "w") as t:
        for name, data in members:
            key, ext = name.split(".", 1)
            if ext == "jpg" and len(broken) < n:
                broken.append(key)
                data = b"\xff\xd8 this is no JPEG"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    manifest = json.loads((dst / "manifest.json").read_text())
    for rec in manifest["shards"]:
        if rec["name"] == shard.name:
            body = shard.read_bytes()
            rec["bytes"], rec["sha256"] = len(body), hashlib.sha256(body).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest))
    images = sum(r["samples"] for r in manifest["shards"] if r["split"] == "train")
    return images, broken


def test_corrupt_jpegs_are_logged_per_epoch_or_stop_the_job(ray_local, shards, tmp_path, capsys):
    from dvsa.train.launch import train

    kp = tmp_path / "kp"
    images, broken = _with_corrupt_jpegs(shards / "kp", kp, 4)
    assert 4 > 0.05 * images and 4 < 0.5 * images, images

    # past data.max_skip_fraction (5 %): the first epoch's check ends the job, in one line
    with pytest.raises(DataError) as e:
        train(_cfg(kp, tmp_path / "strict", "train.name=strict", "train.epochs=3"), "align")
    assert str(e.value).startswith(
        f"[strict] stopped at epoch 1: data.max_skip_fraction: 4 of {images} train samples "
        f"({4 / images:.1%}) were skipped in one pass, more than 5.0%; mostly corrupt_image (4), first: ")
    assert "train-" in str(e.value) and "corrupt_image" in str(e.value)
    c = MlflowClient(f"sqlite:///{tmp_path / 'strict' / 'mlflow.db'}")
    (run,) = c.search_runs([c.get_experiment_by_name("dvsa-tiny").experiment_id])
    assert run.info.status == "FAILED"
    assert [m.value for m in c.get_metric_history(run.info.run_id, "data/skipped_corrupt_image")] == [4.0]

    # allowed: training goes on; every epoch logs the 4 skips; the end prints the totals
    cfg = _cfg(kp, tmp_path / "lenient", "train.name=lenient", "train.epochs=2", "data.max_skip_fraction=0.5")
    outcome = train(cfg, "align")
    per_epoch = (images - 4) // cfg.data.batch_size          # the rows that made it, full batches
    assert outcome.epoch == 2 and outcome.step == 2 * per_epoch
    c = MlflowClient(outcome.tracking_uri)
    history = sorted((m.step, m.value) for m in c.get_metric_history(outcome.run_id, "data/skipped_corrupt_image"))
    assert history == [(per_epoch, 4.0), (2 * per_epoch, 4.0)]
    assert sorted(m.value for m in c.get_metric_history(outcome.run_id, "data/skipped")) == [4.0, 4.0]
    out = capsys.readouterr().out
    assert "  skipped train samples (all passes): corrupt_image=8; first corrupt_image: " in out
    assert any(f"{k} (" in out for k in broken)


def test_more_workers_than_the_local_ray_has_are_refused_before_training(ray_local, shards, tmp_path):
    from dvsa.train.launch import train

    cfg = _cfg(shards / "kp", tmp_path, "train.num_workers=3")
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"^train.num_workers=3 x \(CPU 1\) \+ CPU 1 for decoding needs CPU 4; "
                                          r"this local Ray has CPU 2"):
        train(cfg, "align")
    assert time.time() - t0 < 60
    assert not (tmp_path / "ray_results").exists() or not any((tmp_path / "ray_results").iterdir())


def test_sigterm_ends_a_training_job_and_its_run_killed(shards, tmp_path):
    out = tmp_path / "job"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "dvsa.cli", "train-align", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"out={out}", f"data.shards={shards / 'kp'}", f"data.fullframe_shards={shards / 'kp'}",
           f"train.storage_path={out / 'ray_results'}", "train.name=sig", "train.epochs=50"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank0 = out / "jobs" / "sig" / "progress" / "rank0.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not rank0.exists():
        time.sleep(0.5)
    assert proc.poll() is None and rank0.exists(), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "dvsa train-align: terminated (SIGTERM)" in stderr
    c = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = c.search_runs([c.get_experiment_by_name("dvsa-tiny").experiment_id])
    assert run.info.status == "KILLED"
