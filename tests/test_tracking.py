"""dvsa.tracking against a real SQLite MLflow store (no Ray)."""

import math
import multiprocessing as mp

import pytest

from dvsa import tracking, viz


@pytest.fixture
def uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tracking.tracking_uri(tmp_path)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.tracking_uri(tmp_path, "http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert tracking.tracking_uri(tmp_path, "http://mlflow:5000") == "sqlite:////elsewhere/m.db"


def test_prepare_store_creates_db_and_experiment_once(uri, tmp_path):
    e1 = tracking.prepare_store(uri, "exp")
    e2 = tracking.prepare_store(uri, "exp")
    assert e1 == e2 and (tmp_path / "mlflow.db").is_file()


def test_run_params_metrics_and_resume(uri):
    logger, resumed = tracking.start_run(uri, "exp", "r1", {"task": "caption", "mode": "region"},
                                         resume_name="job-a")
    assert not resumed
    params = {f"p{i}": i for i in range(150)}          # > one log_batch of params
    params.update({"train.name": None, "tune.space": {"a": [1, 2]}, "long": "x" * 7000})
    assert logger.log_params(params) == {}
    for s in range(1, 6):
        logger.log_metrics({"train/loss": 1.0 / s, "bad": math.nan, "text": "skip"}, step=s, flush=False)
    logger.flush()
    assert logger.metric_history("train/loss") == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]
    assert logger.metric_history("bad") == []
    run = tracking.find_run(uri, logger.run_id)
    assert run.data.tags["task"] == "caption" and run.data.tags[tracking.TRAIN_NAME_TAG] == "job-a"
    assert run.data.params["p149"] == "149" and run.data.params["train.name"] == "None"
    assert run.data.params["tune.space"] == '{"a": [1, 2]}'
    assert len(run.data.params["long"]) == tracking.MAX_PARAM_CHARS
    logger.end("FINISHED")

    # the same train name reopens the run; a changed value is kept aside as a tag
    again, resumed = tracking.start_run(uri, "exp", "r1", {"task": "caption"}, resume_name="job-a")
    assert resumed and again.run_id == logger.run_id
    assert tracking.find_run(uri, again.run_id).info.status == "RUNNING"
    assert again.log_params({"p1": 1, "p2": 99, "new": "n"}) == {"p2": "99"}
    run = tracking.find_run(uri, again.run_id)
    assert run.data.params["p2"] == "2" and run.data.tags["changed.p2"] == "99" and run.data.params["new"] == "n"
    # another name makes another run
    other, resumed = tracking.start_run(uri, "exp", "r2", {}, resume_name="job-b")
    assert not resumed and other.run_id != logger.run_id


def test_artifacts_table_dict_and_curves(uri, tmp_path):
    logger, _ = tracking.start_run(uri, "exp", None, {})
    logger.log_table([{"image_id": 1, "generated": "a dog", "reference": "a brown dog"},
                      {"image_id": 2, "generated": "", "reference": "a cat"}], "samples/val.json")
    logger.log_dict({"best": "/x"}, "checkpoint.json")
    png = viz.plot_curves({"train/loss": [(1, 3.0), (2, 2.0)], "val/loss": []}, tmp_path / "c.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logger.log_artifact(png, "plots")
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    names = {a.path for a in c.list_artifacts(logger.run_id)}
    assert {"checkpoint.json", "samples", "plots"} <= names
    assert [a.path for a in c.list_artifacts(logger.run_id, "plots")] == ["plots/c.png"]
    # artifacts live beside the SQLite file, not in ./mlruns of the current directory
    exp = c.get_experiment_by_name("exp")
    assert exp.artifact_location == (tmp_path.resolve() / "mlartifacts" / "exp").as_uri()
    assert (tmp_path / "mlartifacts" / "exp").is_dir()
    import json

    table = json.loads(open(c.download_artifacts(logger.run_id, "samples/val.json")).read())
    assert table["columns"] == ["image_id", "generated", "reference"] and len(table["data"]) == 2


def test_retry_locked_retries_only_lock_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.retry_locked(flaky, delay=0.001) == "ok" and len(calls) == 3

    def broken():
        calls.append(1)
        raise ValueError("no such table")

    calls.clear()
    with pytest.raises(ValueError):
        tracking.retry_locked(broken, delay=0.001)
    assert len(calls) == 1


def _log_from_process(uri, run_id, worker):
    logger = tracking.RunLogger(uri, run_id)
    for s in range(40):
        logger.log_metrics({f"w{worker}": float(s)}, step=s)


def test_concurrent_writers_lose_nothing(uri):
    logger, _ = tracking.start_run(uri, "exp", None, {})   # the driver migrates the store first
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_log_from_process, args=(uri, logger.run_id, w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    for w in range(2):
        assert [s for s, _ in logger.metric_history(f"w{w}")] == list(range(40))


def test_ending_sets_the_run_status_from_how_the_block_ends(uri, caplog):
    def status_after(body):
        logger, _ = tracking.start_run(uri, "exp", "r", {"task": "caption"})
        try:
            with tracking.ending(logger):
                body()
        except (RuntimeError, KeyboardInterrupt):
            pass
        return tracking.client(uri).get_run(logger.run_id).info.status

    def fail():
        raise RuntimeError("job error")

    def interrupt():
        raise KeyboardInterrupt

    assert status_after(lambda: None) == "FINISHED"
    assert status_after(fail) == "FAILED"
    assert status_after(interrupt) == "KILLED"

    # a run that cannot be ended is a warning; the block's own error still comes through
    logger, _ = tracking.start_run(uri, "exp", "r", {"task": "caption"})
    logger.end = lambda status: (_ for _ in ()).throw(OSError("store gone"))
    with pytest.raises(RuntimeError, match="job error"):
        with tracking.ending(logger):
            fail()
    assert "could not end MLflow run" in caplog.text and "store gone" in caplog.text
