"""dvsa.runtime: quiet environment, cluster address, Ray temp dir placement (no Ray started)."""

import logging
import os
from pathlib import Path

import pytest

from dvsa import runtime


def test_quiet_environment_sets_defaults_but_keeps_user_values(monkeypatch):
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")   # the user's explicit choice wins
    env = runtime.quiet_environment()
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "false"
    assert set(env) == set(runtime.QUIET_ENV)


def test_cluster_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runtime.cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert runtime.cluster_address(None) == "10.0.0.1:6379"
    assert runtime.cluster_address("ray://head:10001") == "ray://head:10001"
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert runtime.cluster_address(None) is None


def test_temp_dir_inside_short_out_dir(tmp_path, monkeypatch):
    # a short output path: the temp dir is <out>/ray-tmp itself
    short = Path("/tmp") / f"dvsa-rt-{os.getpid()}"
    try:
        d = runtime.ray_temp_dir(short)
        assert d == str(short.resolve() / "ray-tmp") and Path(d).is_dir()
        assert len(d) <= runtime.MAX_TEMP_DIR_LEN
    finally:
        import shutil

        shutil.rmtree(short, ignore_errors=True)


def test_temp_dir_for_long_out_dir_is_short_and_linked(tmp_path):
    out = tmp_path / ("x" * 60) / "run"
    d = runtime.ray_temp_dir(out)
    try:
        # Ray's socket paths = temp dir + ~64 chars must stay under 107
        assert len(d) <= runtime.MAX_TEMP_DIR_LEN
        assert len(d) + len("/session_2026-01-01_12-00-00_123456_1234567/sockets/plasma_store") <= 107
        link = out / "ray-tmp"
        assert link.is_symlink() and os.readlink(link) == d
        assert (out / "ray-tmp.txt").read_text().strip() == d
        # a second job in the same output dir reuses the linked dir
        assert runtime.ray_temp_dir(out) == d
    finally:
        os.rmdir(d)


def test_a_joined_cluster_needs_shared_paths_and_a_tracking_server(monkeypatch, tmp_path, caplog):
    """`ray job submit` sets RAY_ADDRESS: relative shard/checkpoint paths (they would resolve in
    the job's temporary working dir on the head) are refused in one line, before Ray; the
    driver-local SQLite default is a warning (`ray start --head` on one machine is a joined
    cluster too); an embedded Ray keeps the laptop defaults."""
    from dvsa.config import Config, ConfigError
    from dvsa.train.launch import check_inputs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config().replace(**{"task": "align", "data.shards": "runs/data/vg", "out": str(tmp_path)})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runtime.require_shared_paths(None, {"data.shards": "runs/data/vg"})      # laptop: fine
    runtime.warn_without_tracking_server(None, None)

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ConfigError) as e:
        check_inputs(cfg, "align")
    assert str(e.value) == (
        "data.shards=runs/data/vg: a relative path, but this job runs on the Ray cluster at http://127.0.0.1:8265, "
        "where it would resolve inside the job's temporary working dir on one node; give an absolute path on "
        "shared storage (e.g. /mnt/efs/dvsa/...) or a URL (s3://...)")
    shared = cfg.replace(**{"data.shards": "/mnt/efs/dvsa/data/vg"})
    with pytest.raises(ConfigError, match="^train.storage_path=runs/ray_results: a relative path"):
        check_inputs(shared, "align")
    shared = shared.replace(**{"train.storage_path": "s3://bucket/dvsa/ray_results"})
    with caplog.at_level(logging.WARNING, logger="dvsa.runtime"):
        with pytest.raises(Exception, match="no such shard directory: /mnt/efs/dvsa/data/vg"):
            check_inputs(shared, "align")                  # on to the next check, with a warning
    assert "mlflow.tracking_uri: this job runs on the Ray cluster at http://127.0.0.1:8265 with the default" \
        in caplog.text
    caplog.clear()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    with caplog.at_level(logging.WARNING, logger="dvsa.runtime"):
        with pytest.raises(Exception, match="no such shard directory: /mnt/efs/dvsa/data/vg"):
            check_inputs(shared, "align")
    assert "mlflow.tracking_uri" not in caplog.text


def test_loopback_addresses():
    """A join address on loopback (another dvsa process's embedded Ray) is joined with the node IP
    kept on loopback (runtime.loopback_ray); any other address is left to Ray."""
    assert runtime.is_loopback_address("127.0.0.1:6379")
    assert runtime.is_loopback_address("localhost:6379")
    assert runtime.is_loopback_address("[::1]:6379")
    assert not runtime.is_loopback_address("10.0.0.1:6379")
    assert not runtime.is_loopback_address("head.example:6379")
    assert not runtime.is_loopback_address("http://127.0.0.1:8265")      # a job-submission URL
    assert not runtime.is_loopback_address("ray://127.0.0.1:10001")
