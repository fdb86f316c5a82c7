"""Ray Tune sweeps recorded in MLflow: search space, resources, ASHA early stopping, Optuna with
concurrent trials, parent/child runs with every per-epoch metric, the best config, resume.

Each sweep runs once: the ASHA sweep is a module fixture shared by the ASHA test and the
best-config test; step counts are derived from the shards' manifests."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from run_checks import steps_per_epoch

from dvsa.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ray_tune():
    """One local Ray for this module, started the way ``dvsa tune`` starts it (dashboard on a port
    of its own), with 4 logical CPUs so that 4 trials can run at once on 2 cores."""
    from dvsa import runtime

    tmp = Path(tempfile.mkdtemp(prefix="dvsa-tune-", dir="/tmp"))
    with runtime.ray_session(tmp, num_cpus=4) as info:
        yield info
    shutil.rmtree(tmp, ignore_errors=True)


def sweep_cfg(shards, out, *overrides, **dotted):
    cfg = load_config(ROOT / "configs" / "tune_tiny.yaml", [
        f"out={out}", f"data.shards={shards / 'vg'}", f"data.fullframe_shards={shards / 'kp'}",
        f"train.storage_path={out / 'ray_results'}", "data.max_val_images=12", "train.epochs=2",
        "tune.time_budget_s=null", *overrides])
    return cfg.replace(**dotted) if dotted else cfg


def mlflow_client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def children(uri, parent_run_id):
    c = mlflow_client(uri)
    exp = c.get_run(parent_run_id).info.experiment_id
    runs = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.data.tags["dvsa.trial_id"]: r for r in runs}


def history(uri, run_id, key):
    return [(m.step, m.value) for m in sorted(mlflow_client(uri).get_metric_history(run_id, key),
                                              key=lambda m: (m.step, m.timestamp))]


# --------------------------------------------------------------------------- units (no Ray)


def test_space_domains_and_checks(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    from dvsa.tuning import space

    cfg = load_config(ROOT / "configs" / "tune_tiny.yaml").replace(**{"tune.space": {
        "train.lr": {"loguniform": [1e-4, 1e-2]}, "model.hidden_dim": {"uniform": [300, 600]},
        "model.embed_dim": {"loguniform": [1000, 1600]}, "caption.beam_size": {"choice": [1, 3, 7]},
        "model.dropout": {"uniform": [0.0, 0.5]}, "train.weight_decay": {"grid": [0.0, 1e-4]},
        "data.batch_size": {"randint": [4, 8]}}})
    space.check_sweep(cfg)
    ps = space.param_space(cfg)
    assert isinstance(ps["train.lr"], Float) and (ps["train.lr"].lower, ps["train.lr"].upper) == (1e-4, 1e-2)
    # int keys get integer domains, both ends included (Tune's upper bound is exclusive)
    assert isinstance(ps["model.hidden_dim"], Integer) and (ps["model.hidden_dim"].lower,
                                                            ps["model.hidden_dim"].upper) == (300, 601)
    assert isinstance(ps["model.embed_dim"], Integer) and ps["model.embed_dim"].upper == 1601
    assert isinstance(ps["data.batch_size"], Integer) and ps["data.batch_size"].upper == 9
    assert isinstance(ps["caption.beam_size"], Categorical)
    assert ps["train.weight_decay"] == {"grid_search": [0.0, 1e-4]}
    assert space.expected_trials(cfg) == 4 * 2            # num_samples x grid
    # sampled values (numpy scalars) come back as plain config values
    import numpy as np

    got = space.apply_params(cfg, {"model.hidden_dim": np.int64(301), "train.lr": np.float64(0.002)})
    assert got.model.hidden_dim == 301 and type(got.model.hidden_dim) is int and got.train.lr == 0.002

    grid = cfg.replace(**{"tune.search": "grid", "tune.num_samples": 1,
                          "tune.space": {"caption.beam_size": {"choice": [1, 3, 7]},
                                         "train.lr": {"grid": [1e-3, 1e-2]}}})
    assert space.param_space(grid)["caption.beam_size"] == {"grid_search": [1, 3, 7]}
    assert space.expected_trials(grid) == 6

    bad = [({"tune.space": {}}, "tune.space: empty"),
           ({"tune.search": "optuna", "tune.space": {"train.lr": {"grid": [0.1, 0.2]}}},
            "tune.space.train.lr: grid is not supported with tune.search=optuna"),
           ({"tune.search": "grid", "tune.space": {"train.lr": {"uniform": [0.1, 0.2]}}},
            "tune.search=grid needs grid or choice"),
           ({"tune.space": {"train.name": {"choice": ["a", "b"]}}}, "set by the sweep itself"),
           ({"tune.metric": "loss"}, "tune.metric: 'loss' is not a metric task=caption reports every epoch"),
           ({"tune.metric": "val/rsum"}, "tune.metric: 'val/rsum' is not a metric task=caption"),
           ({"tune.metric": "val/METEOR", "tune.mode": "min"},
            "tune.mode: val/METEOR is better larger: use tune.mode=max"),
           ({"train.use_gpu": True}, "tune.gpus_per_trial: 0, but train.use_gpu is true"),
           ({"tune.grace_period": 5}, "tune.grace_period: 5 epochs is more than train.epochs")]
    for dotted, msg in bad:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace("+", r"\+")):
            space.check_sweep(cfg.replace(**dotted))
    with pytest.raises(ConfigError, match="tune.driver_cpus: must be > 0"):
        cfg.replace(**{"tune.driver_cpus": 0})
    with pytest.raises(ConfigError, match="tune.space.model.dropout: candidate 1.5 is invalid"):
        cfg.replace(**{"tune.space": {"model.dropout": {"uniform": [0.0, 1.5]}}})


def test_resources_and_concurrency_by_hand():
    from dvsa.tuning import space

    cfg = load_config(ROOT / "configs" / "tune_tiny.yaml")       # driver 0.1 + workers 0.4 per trial
    assert space.trial_resources(cfg) == {"cpu": 0.1}
    # (2 CPUs - 1 kept for Ray Data) / 0.5 = 2; 4 CPUs: 6, capped by max_concurrent_trials
    assert space.max_concurrent(cfg, {"CPU": 2.0}) == 2
    assert space.max_concurrent(cfg.replace(**{"tune.max_concurrent_trials": 4}), {"CPU": 4.0}) == 4
    assert space.max_concurrent(cfg.replace(**{"tune.max_concurrent_trials": 9}), {"CPU": 4.0}) == 6
    with pytest.raises(ConfigError, match="a trial needs 1.1 CPUs"):
        space.max_concurrent(cfg.replace(**{"tune.cpus_per_trial": 1.0}), {"CPU": 2.0})
    # a cluster the sweep joined may autoscale (ray_cluster.yaml's GPU workers start at 0):
    # no cap and no refusal; what fits now is only reported
    vg = load_config(ROOT / "configs" / "tune_vg.yaml")           # 8.1 CPUs + 1 GPU per trial
    space.check_sweep(vg)
    with pytest.raises(ConfigError, match="a trial needs 8.1 CPUs"):
        space.max_concurrent(vg, {"CPU": 8.0})
    assert space.max_concurrent(vg, {"CPU": 8.0}, elastic=True) == vg.tune.max_concurrent_trials == 8
    assert space.trials_that_fit(vg, {"CPU": 8.0}) == 0
    assert space.trials_that_fit(vg, {"CPU": 8.0 + 4 * 16, "GPU": 4.0}) == 4
    assert space.max_concurrent(vg, {"CPU": 8.0 + 4 * 16, "GPU": 4.0}) == 4
    # fractional GPUs: 4 single-worker trials share one GPU
    g = cfg.replace(**{"tune.gpus_per_trial": 0.25, "tune.max_concurrent_trials": 8, "tune.cpus_per_trial": 1.0})
    assert space.max_concurrent(g, {"CPU": 16.0, "GPU": 1.0}) == 4
    assert space.worker_settings(g) == {"train.cpus_per_worker": 1.0, "train.use_gpu": True,
                                        "train.gpus_per_worker": 0.25}
    two = g.replace(**{"train.num_workers": 2})
    assert space.worker_settings(two)["train.gpus_per_worker"] == 0.125
    from dvsa.tuning.trial import trial_config

    tc = trial_config(two, {"train.lr": 0.004}, "sw", "abc_00001", "/s")
    assert tc.train.name == "abc_00001" and tc.train.storage_path == "/s/sw-trials"
    assert tc.train.lr == 0.004 and tc.train.val_every == 1 and tc.train.gpus_per_worker == 0.125


def test_outcome_table_and_best_config(tmp_path):
    from dvsa.tuning.mlflow_callback import reported_metrics, trial_outcome
    from dvsa.tuning.report import TrialRow, best_config, format_table, write_best_config

    assert trial_outcome({"epoch": 3, "step": 30}, 3, 0) == "finished"
    assert trial_outcome({"epoch": 1, "step": 10}, 3, 0) == "early_stopped"
    assert trial_outcome({"epoch": 1, "step": 10}, 3, 10) == "finished"          # max_steps reached
    assert trial_outcome({"epoch": 3}, 3, 0, errored=True) == "error"
    assert reported_metrics({"epoch": 2, "val/loss": 1.5, "train/epoch_loss": 2.0, "time_this_iter_s": 3.0,
                             "checkpoint_path": "/x", "done": False, "training_iteration": 2}) == \
        {"epoch": 2, "val/loss": 1.5, "train/epoch_loss": 2.0}
    rows = [TrialRow("t_00001", "early_stopped", 1, {"train.lr": 1e-6}, 3.25),
            TrialRow("t_00000", "finished", 2, {"train.lr": 0.005}, 2.5, best=True)]
    table = format_table(rows, "val/loss").splitlines()
    assert table[0].split() == ["trial", "outcome", "epochs", "train.lr", "val/loss"]
    assert table[2].split() == ["*", "t_00000", "finished", "2", "0.005", "2.5"]
    assert table[3].split() == ["t_00001", "early_stopped", "1", "1e-06", "3.25"]
    base = load_config(ROOT / "configs" / "tune_tiny.yaml", ["tune.name=sw"])
    cfg = best_config(base, {"train.lr": 0.005, "model.hidden_dim": 32})
    path = write_best_config(cfg, tmp_path / "best.yaml", "sw", rows[1], "val/loss")
    back = load_config(path)
    assert back == cfg and back.train.lr == 0.005 and back.model.hidden_dim == 32
    assert back.tune.space == {} and back.tune.name is None and back.train.name is None
    assert path.read_text().startswith("# best trial t_00000 of sweep sw: val/loss = 2.5")


def test_cli_refuses_a_bad_sweep_in_one_line(tmp_path, capsys, monkeypatch):
    from dvsa import runtime
    from dvsa.cli import main

    def no_ray(*a, **k):
        raise AssertionError("Ray was touched before the config was checked")

    monkeypatch.setattr(runtime, "ray_session", no_ray)
    rc = main(["tune", "--config", str(ROOT / "configs" / "tune_tiny.yaml"), f"out={tmp_path}",
               "tune.space={}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("dvsa tune: config error: tune.space: empty")
    assert not (tmp_path / "ray-tmp").exists()             # refused before any Ray work


# --------------------------------------------------------------------------- sweeps on a local Ray


@pytest.fixture(scope="module")
def asha_sweep(ray_tune, shards, tmp_path_factory):
    """Region captioner, 2 trials one after the other: the first has a useful learning rate, the
    second learns nothing. ASHA (rung at epoch 1, reduction factor 4) keeps a trial only if it is
    in the top quarter of the trials recorded at the rung, so the second is stopped after epoch 1
    and the first trains on. Shared by the ASHA test and the best-config test."""
    from dvsa.tuning import run_sweep

    out = tmp_path_factory.mktemp("asha")
    cfg = sweep_cfg(shards, out, **{
        "tune.name": "asha", "tune.search": "grid", "tune.scheduler": "asha", "tune.num_samples": 1,
        "tune.grace_period": 1, "tune.reduction_factor": 4, "tune.max_concurrent_trials": 1,
        "tune.space": {"train.lr": {"grid": [0.01, 1e-7]}}})
    return cfg, run_sweep(cfg)


@pytest.mark.ray
def test_asha_stops_the_bad_trials_and_mlflow_has_parent_and_children(asha_sweep):
    cfg, outcome = asha_sweep
    assert len(outcome.trials) == 2 and not outcome.resumed
    by_lr = {r.params["train.lr"]: r for r in outcome.trials}
    good, bad = by_lr[0.01], by_lr[1e-7]
    assert good.outcome == "finished" and good.epochs == 2 and good.best and outcome.best is good
    assert bad.outcome == "early_stopped" and bad.epochs == 1 and not bad.best
    c = mlflow_client(outcome.tracking_uri)
    parent = c.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["dvsa.role"] == "sweep"
    assert parent.data.tags["dvsa.best_trial"] == good.trial_id
    assert {k: parent.data.metrics[f"trials/{k}"] for k in ("total", "finished", "early_stopped", "error")} == \
        {"total": 2, "finished": 1, "early_stopped": 1, "error": 0}
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"summary.txt", "best_config.yaml", "summary_table.json"} <= arts
    kids = children(outcome.tracking_uri, outcome.parent_run_id)
    assert set(kids) == {r.trial_id for r in outcome.trials}
    per_epoch = steps_per_epoch(cfg.data.shards, cfg.data.batch_size)
    for r in outcome.trials:
        run = kids[r.trial_id]
        assert run.info.run_id == r.run_id
        # stopped trials are closed, never left RUNNING
        assert run.info.status == ("FINISHED" if r.outcome == "finished" else "KILLED")
        assert run.data.tags["dvsa.trial_outcome"] == r.outcome
        assert float(run.data.params["train.lr"]) == r.params["train.lr"]
        assert run.data.params["train.name"] == r.trial_id
        epochs = [v for _, v in history(outcome.tracking_uri, r.run_id, "epoch")]
        assert epochs == [float(e) for e in range(1, r.epochs + 1)]
        for key in ("val/loss", "val/METEOR", "train/epoch_loss"):     # at each epoch's last step, once
            assert [s for s, _ in history(outcome.tracking_uri, r.run_id, key)] == \
                [per_epoch * e for e in range(1, r.epochs + 1)], key
        assert history(outcome.tracking_uri, r.run_id, "val/loss")[-1][1] == pytest.approx(r.metric)
    assert kids[good.trial_id].data.tags.get("dvsa.best") == "true"
    assert sum(k.data.tags.get("dvsa.best") == "true" for k in kids.values()) == 1
    summary = Path(outcome.summary).read_text()
    assert all(r.trial_id in summary for r in outcome.trials) and "early_stopped" in summary


@pytest.mark.ray
def test_best_config_trains_with_train_caption(asha_sweep, tmp_path):
    from dvsa.train.launch import train

    cfg, outcome = asha_sweep
    best = load_config(outcome.best_config, [f"out={tmp_path}", f"train.storage_path={tmp_path / 'rr'}",
                                              "train.epochs=1"])
    assert best.train.lr == 0.01 and best.task == "caption" and best.tune.space == {}
    # the sweep's settings with the best trial's parameters, nothing else
    assert best == cfg.replace(**{"tune.space": {}, "tune.name": None, "train.lr": 0.01, "out": str(tmp_path),
                                  "train.storage_path": str(tmp_path / "rr"), "train.epochs": 1})
    result = train(best, "caption")
    assert (result.epoch, result.step) == (1, steps_per_epoch(best.data.shards, best.data.batch_size))
    assert result.checkpoint and Path(result.checkpoint).is_dir()
    assert "val/loss" in result.metrics


@pytest.mark.ray
def test_time_budget_ends_concurrent_optuna_trials_and_loses_no_metric(ray_tune, shards, tmp_path):
    """Optuna TPE + ASHA, 3 trials of 60 epochs all at once, tune.time_budget_s: Tune ends the
    sweep once the budget is spent; every trial (stopped by the budget or by ASHA) is closed in
    MLflow (KILLED, early_stopped), never left RUNNING, and each epoch it reported reached its
    child run exactly once, at the step the manifest dictates. (How long the sweep took is a
    benchmark's business, not asserted here.)"""
    from dvsa.tuning import run_sweep

    budget = 25                  # each trial opens its MLflow run when it starts, seconds in
    cfg = sweep_cfg(shards, tmp_path, "task=align", **{
        "tune.name": "budget", "tune.search": "optuna", "tune.scheduler": "asha", "tune.num_samples": 3,
        "tune.max_concurrent_trials": 3, "tune.cpus_per_trial": 0.5, "train.epochs": 60, "tune.grace_period": 1,
        "tune.time_budget_s": budget,
        "tune.space": {"train.lr": {"loguniform": [1e-3, 1e-2]}, "model.hidden_dim": {"randint": [16, 48]}}})
    outcome = run_sweep(cfg)
    assert len(outcome.trials) == 3 and all(r.outcome == "early_stopped" for r in outcome.trials)
    assert len({r.params["train.lr"] for r in outcome.trials}) == 3        # TPE's start-up samples differ
    assert all(16 <= r.params["model.hidden_dim"] <= 48 and 1e-3 <= r.params["train.lr"] <= 1e-2
               for r in outcome.trials)
    assert list(Path(outcome.experiment_dir).glob("searcher-state-*")), "Optuna searcher state not saved"
    c = mlflow_client(outcome.tracking_uri)
    assert c.get_run(outcome.parent_run_id).info.status == "FINISHED"
    kids = children(outcome.tracking_uri, outcome.parent_run_id)
    assert set(kids) == {r.trial_id for r in outcome.trials}, "a stopped trial never opened its MLflow run"
    keys = ("epoch", "train/epoch_loss", "val/loss", "val/rsum", "val/i2t_r1", "val/t2i_r5")
    per_epoch = steps_per_epoch(cfg.data.fullframe_shards, cfg.data.batch_size)
    spans = []
    for r in outcome.trials:
        run = kids[r.trial_id]
        assert 0 <= r.epochs < 60                          # 0: stopped before its first report
        assert run.info.status == "KILLED" and run.data.tags["dvsa.trial_outcome"] == "early_stopped"
        assert int(run.data.params["model.hidden_dim"]) == r.params["model.hidden_dim"]
        epochs = range(1, r.epochs + 1)
        assert [v for _, v in history(outcome.tracking_uri, r.run_id, "epoch")] == [float(e) for e in epochs]
        for key in keys:                                   # every epoch of every metric, once, at its last step
            assert [s for s, _ in history(outcome.tracking_uri, r.run_id, key)] == [per_epoch * e for e in epochs], key
        spans.append((run.info.start_time, run.info.end_time))
    # the trials really ran side by side: at some moment all three child runs were open
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    open_runs = [0]
    for _, d in events:
        open_runs.append(open_runs[-1] + d)
    assert max(open_runs) == 3, spans
    scored = [r for r in outcome.trials if r.metric is not None]
    if scored:                                            # the best of those that reported an epoch
        assert outcome.best is min(scored, key=lambda r: r.metric)
        assert load_config(outcome.best_config).task == "align"


# --------------------------------------------------------------------------- resume


def _experiment_state_terminated(exp_dir: Path) -> int:
    n = 0
    for f in exp_dir.glob("experiment_state-*.json"):
        try:
            n = max(n, f.read_text().count("TERMINATED"))
        except OSError:
            pass
    return n


@pytest.mark.ray
def test_resume_after_the_driver_is_killed(ray_tune, shards, tmp_path):
    """``dvsa tune`` in a subprocess, a driver joining this module's Ray (``ray.address``) as it
    would join a cluster: kill it once a trial has finished and the Tune experiment state records
    it (Ray ends the dead driver's trials), re-run the same command; the finished trial is kept."""
    import ray

    out = tmp_path / "out"
    args = [sys.executable, "-m", "dvsa.cli", "tune", "--config", str(ROOT / "configs" / "tune_tiny.yaml"),
            "--name", "resume", "--outcome-json", str(tmp_path / "outcome.json"),
            f"out={out}", f"data.shards={shards / 'vg'}", f"data.fullframe_shards={shards / 'kp'}",
            f"train.storage_path={out / 'rr'}", "data.max_val_images=6", "train.epochs=1", "task=align",
            "tune.search=grid", "tune.scheduler=fifo", "tune.num_samples=1", "tune.max_concurrent_trials=1",
            "tune.space={train.lr: {grid: [0.004, 0.002]}}",
            f"ray.address={ray.get_runtime_context().gcs_address}"]
    # TUNE_GLOBAL_CHECKPOINT_S: Tune writes its experiment state every second (by default every
    # 10 s or more), so the kill below follows the finished trial closely
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    env.pop("RAY_ADDRESS", None)                             # ray.address above says where to go
    exp_dir = out / "rr" / "resume"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + 600
            while time.time() < deadline and proc.poll() is None and _experiment_state_terminated(exp_dir) < 1:
                time.sleep(0.25)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)       # the driver (and anything it spawned)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert not (tmp_path / "outcome.json").exists()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    c = mlflow_client(uri)
    parents = c.search_runs([c.get_experiment_by_name("dvsa-tiny").experiment_id],
                            filter_string="tags.`dvsa.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "RUNNING"      # the killed driver never ended it
    before = {tid: r for tid, r in children(uri, parents[0].info.run_id).items() if r.info.status == "FINISHED"}
    assert before, "no trial finished before the driver was killed"
    before_hist = {tid: history(uri, r.info.run_id, "val/loss") for tid, r in before.items()}

    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome["resumed"] and outcome["parent_run_id"] == parents[0].info.run_id
    assert len(outcome["trials"]) == 2 and all(t["outcome"] == "finished" for t in outcome["trials"])
    kids = children(uri, parents[0].info.run_id)
    assert len(kids) == 2 and all(r.info.status == "FINISHED" for r in kids.values())
    for tid, r in before.items():                          # kept, not trained again
        assert kids[tid].info.run_id == r.info.run_id
        assert history(uri, r.info.run_id, "val/loss") == before_hist[tid]
        assert kids[tid].info.end_time == r.info.end_time
    per_epoch = steps_per_epoch(shards / "kp", 8)           # tune_tiny.yaml: data.batch_size 8
    for r in kids.values():                                 # the epoch logged exactly once, at its last step
        assert history(uri, r.info.run_id, "epoch") == [(per_epoch, 1.0)]
    assert c.get_run(parents[0].info.run_id).info.status == "FINISHED"
