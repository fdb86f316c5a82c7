"""A two-node Ray cluster on this one machine, driven the way a user drives a real one.

`ray start --head` plus a second `ray start --address`, both with token auth on
(RAY_AUTH_MODE=token and a token of this test's own in RAY_AUTH_TOKEN), the dashboard bound
to 127.0.0.1; jobs go in through `ray job submit`. Each node advertises 3 CPUs and every
train worker asks for 2, so the two workers cannot share a node: a run that finishes used
both nodes. Only the processes this module started are stopped (by PID and process group);
never `ray stop`, which would kill other users' Ray.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from run_checks import steps_per_epoch

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
NODE_CPUS = 3          # per node; a train worker asks for 2, so at most one worker per node
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 300


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid``, read from /proc (no psutil here)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parent_of[int(entry)] = ppid
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        out.extend(kids)
        frontier.extend(kids)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stop_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL: ``proc``, its process group and every descendant we can see."""
    pids = [proc.pid] + _children(proc.pid)
    try:
        pgid = os.getpgid(proc.pid)
    except OSError:
        pgid = None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if pgid is not None:
            try:
                os.killpg(pgid, sig)
            except OSError:
                pass
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
        if not any(_alive(p) for p in pids):
            return


# --------------------------------------------------------------------------- cluster


class TwoNodeCluster:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="dvsa2n-", dir="/tmp"))
        self.gcs_port = _free_port()
        self.dash_port = _free_port()
        self.token = secrets.token_hex(32)
        self.env = dict(os.environ)
        self.env.update({
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            "TQDM_DISABLE": "1",
            "PYTHONUNBUFFERED": "1",
            "RAY_DEDUP_LOGS": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"):
            self.env.pop(var, None)
        self.procs: list[subprocess.Popen] = []

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    def _ray_start(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.tmp / log, "wb")
        proc = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", f"--num-cpus={NODE_CPUS}",
             "--num-gpus=0", "--object-store-memory=150000000",
             f"--dashboard-agent-listen-port={_free_port()}",
             f"--dashboard-agent-grpc-port={_free_port()}",
             f"--metrics-export-port={_free_port()}",
             f"--runtime-env-agent-port={_free_port()}", *args],
            env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=self.tmp,
        )
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self._ray_start(
            ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dash_port}", f"--ray-client-server-port={_free_port()}",
             f"--temp-dir={self.tmp / 'ray'}"],
            "head.log",
        )
        self._wait_nodes(1)
        # A temp dir of the worker node's own: two raylets on one machine sharing one would
        # both unpack the job's working_dir package into the same runtime_resources folder,
        # and one's unpacking races the other's imports (seen as a ModuleNotFoundError).
        self._ray_start([f"--address=127.0.0.1:{self.gcs_port}", f"--temp-dir={self.tmp / 'ray-worker'}"],
                        "worker.log")
        self._wait_nodes(2)

    def api(self, path: str, token: str | None = "own") -> dict:
        req = urllib.request.Request(self.dashboard + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {self.token if token == 'own' else token}")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> list[dict]:
        data = self.api("/api/v0/nodes?limit=100")
        return [n for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def _wait_nodes(self, n: int) -> None:
        deadline = time.time() + START_TIMEOUT_S
        last = None
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited with {p.returncode}:\n{self.logs()}")
            try:
                if len(self.alive_nodes()) >= n:
                    return
            except Exception as e:  # dashboard not up yet
                last = e
            time.sleep(1.0)
        raise TimeoutError(f"{n} Ray node(s) not alive after {START_TIMEOUT_S}s ({last}):\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    def submit(self, entrypoint: list[str], submission_id: str, cwd: Path,
               runtime_env: list[str]) -> subprocess.CompletedProcess:
        """`ray job submit` (blocks, streams the job's logs) as a user would type it."""
        return subprocess.run(
            [RAY, "job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
             *runtime_env, "--", *entrypoint],
            env=self.env, cwd=cwd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
        )

    def job_status(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}")["status"]

    def job_logs(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}/logs")["logs"]

    def stop(self) -> None:
        for p in reversed(self.procs):
            _stop_tree(p)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = TwoNodeCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


# --------------------------------------------------------------------------- tests


def test_token_auth_guards_the_job_api(cluster):
    """The job API refuses a request without the token and one with a wrong token."""
    assert len(cluster.alive_nodes()) == 2
    for bad in (None, "0" * 64):
        with pytest.raises(urllib.error.HTTPError) as e:
            cluster.api("/api/jobs/", token=bad)
        assert e.value.code in (401, 403)


@pytest.fixture(scope="module")
def vg_shards(shards) -> Path:
    """The session's VG shards (conftest.shards): absolute paths, readable from both nodes."""
    return shards / "vg"


def test_caption_job_trains_with_two_workers_across_both_nodes(cluster, vg_shards, tmp_path):
    """`ray job submit` of the real region-captioner job (RNN cell): 2 workers (one per node),
    each training on its half of the train split; its MLflow run FINISHED with train and
    validation metrics at the steps the manifest dictates, a checkpoint in storage_path."""
    import mlflow

    db = tmp_path / "mlflow.db"
    storage = tmp_path / "ray_results"
    entry = ["python", "-m", "jobs.train_caption", "--config", "configs/tiny.yaml",
             "caption.mode=region", "caption.cell=rnn", f"data.shards={vg_shards}", f"out={tmp_path / 'out'}",
             "train.num_workers=2", "train.cpus_per_worker=2", "train.epochs=1", "train.log_every=1",
             f"train.storage_path={storage}", "train.name=twonode",
             f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=twonode"]
    res = cluster.submit(entry, "dvsa-twonode", cwd=REPO,
                         runtime_env=["--runtime-env", "cluster/runtime_env.yaml"])
    logs = cluster.job_logs("dvsa-twonode")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:] + cluster.logs()
    assert cluster.job_status("dvsa-twonode") == "SUCCEEDED"
    assert "caption: 2 worker(s) on cpu" in logs, logs[-3000:]

    # the two RayTrainWorker actors of the job ran on the two different nodes
    actors = cluster.api("/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert len(workers) == 2, workers
    assert {a["node_id"] for a in workers} == {n["node_id"] for n in cluster.alive_nodes()}

    # the train split was divided between them: each rank (one per worker process) stepped
    # through its half in full batches of 8, once, from scratch
    per_rank = steps_per_epoch(vg_shards, 8, workers=2)
    assert 0 < per_rank < steps_per_epoch(vg_shards, 8)      # a worker seeing everything would step more
    progress = tmp_path / "out" / "jobs" / "twonode" / "progress"
    attempts = [json.loads(line) for line in (progress / "attempts.jsonl").read_text().splitlines()]
    assert sorted((a["rank"], a["start_step"], a["resumed"]) for a in attempts) == [(0, 0, False), (1, 0, False)]
    assert {a["pid"] for a in attempts} == {a["pid"] for a in workers}
    for rank in (0, 1):                  # rank<R>.json: the worker's position after its last step
        done = json.loads((progress / f"rank{rank}.json").read_text())
        assert (done["rank"], done["step"]) == (rank, per_rank), done

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["twonode"], output_format="list")
    assert len(runs) == 1                                     # rank 0 logs; no run per rank
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    for key in ("train/loss", "train/epoch_loss", "train/images_per_s", "val/loss", "val/METEOR"):
        assert key in run.data.metrics, (key, sorted(run.data.metrics))
    assert run.data.metrics["train/images_per_s"] > 0
    assert (run.data.params["caption.cell"], run.data.tags["cell"]) == ("rnn", "rnn")
    assert (run.data.metrics["final/step"], run.data.metrics["final/epoch"]) == (per_rank, 1)
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, per_rank + 1))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [per_rank]
    assert list((storage / "twonode").glob("checkpoint_*")), "no checkpoint in storage_path"


def test_tune_job_via_ray_job_submit(cluster, vg_shards, tmp_path):
    """`ray job submit -- python -m jobs.tune ...`: a 2-trial sweep on the cluster (both trials
    at once), one parent MLflow run with a child run per trial, each trial's epoch at the step
    the manifest dictates, and a best config written."""
    import mlflow

    db = tmp_path / "mlflow.db"
    out = tmp_path / "out"
    entry = ["python", "-m", "jobs.tune", "--config", "configs/tune_tiny.yaml", "--name", "twonode-sweep",
             "tune.num_samples=2", "tune.search=random", "tune.scheduler=fifo", "tune.max_concurrent_trials=2",
             "tune.cpus_per_trial=0.5", "train.epochs=1", "train.log_every=1", f"data.shards={vg_shards}",
             f"out={out}", f"train.storage_path={tmp_path / 'ray_results'}",
             f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.experiment=twonode-tune"]
    res = cluster.submit(entry, "dvsa-twonode-tune", cwd=REPO,
                         runtime_env=["--runtime-env", "cluster/runtime_env.yaml"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:] + cluster.logs()
    assert cluster.job_status("dvsa-twonode-tune") == "SUCCEEDED"

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["twonode-tune"], output_format="list")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    parents = {r.info.run_id for r in runs} - {r.info.run_id for r in children}
    assert len(parents) == 1 and len(children) == 2
    assert all(r.data.tags["mlflow.parentRunId"] in parents for r in children)
    assert all("val/loss" in r.data.metrics for r in children)
    assert all(r.info.status == "FINISHED" and r.data.metrics["epoch"] == 1 for r in children)
    per_epoch = steps_per_epoch(vg_shards, 8)                # tune_tiny.yaml: 1 worker, batch 8
    for r in children:
        assert [m.step for m in mlflow.MlflowClient(f"sqlite:///{db}").get_metric_history(
            r.info.run_id, "val/loss")] == [per_epoch]
    assert (out / "sweeps" / "twonode-sweep" / "best_config.yaml").is_file()


def test_a_job_the_cluster_cannot_place_ends_naming_what_is_missing(cluster, vg_shards, tmp_path):
    """4 workers x 2 CPUs, more than the two nodes have: a joined cluster might grow (autoscaler), so
    the job waits train.start_timeout_s, then fails in one line naming the request and the
    cluster, instead of Ray Train's endless retry."""
    entry = ["python", "-m", "jobs.train_align", "--config", "configs/tiny.yaml", f"data.shards={vg_shards}",
             f"data.fullframe_shards={vg_shards}", f"out={tmp_path / 'out'}", "train.num_workers=4",
             "train.cpus_per_worker=2", "train.start_timeout_s=4", f"train.storage_path={tmp_path / 'rr'}",
             f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    res = cluster.submit(entry, "dvsa-twonode-toolarge", cwd=REPO,
                         runtime_env=["--runtime-env", "cluster/runtime_env.yaml"])
    assert res.returncode != 0 and cluster.job_status("dvsa-twonode-toolarge") == "FAILED"
    logs = cluster.job_logs("dvsa-twonode-toolarge")
    assert re.search(r"dvsa train-align: error: train.start_timeout_s=4: the cluster could not place 4 "
                     r"worker\(s\) of \{CPU 2\} in time; its 2 node\(s\) have CPU \d+ \| CPU \d+ ", logs), logs[-3000:]
