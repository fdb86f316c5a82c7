"""The README's "On a cluster" path, rehearsed on this one machine with the real parts.

* A Ray cluster of a head and one worker node, each its own `ray start` with its own temp dir and
  resources, token auth on (tests/local_cluster.py).
* The cluster's MLflow tracking server, started by the script ray_cluster.yaml runs on the head
  (`cluster/mlflow_server.sh`): PostgreSQL in a temp dir on 127.0.0.1 as the backend store,
  `mlflow server` on 127.0.0.1 with its artifacts on a directory standing for the shared volume.
  As ray_cluster.yaml does, every `ray start` exports MLFLOW_TRACKING_URI, so every job logs there.
* The jobs: exactly the `ray job submit` lines of README.md's "On a cluster" section, read from the
  README (the docs cannot drift), with three substitutions that make them run here: the shared
  volume `/mnt/efs/dvsa` is a temp dir, and `configs/vg.yaml` / `configs/tune_vg.yaml` are
  presets that extend them (`base:`) at test scale (tiny CNN, 64 px, CPU, 2 workers); the
  alignment job alone gets `train.epochs=5` appended, so that it is still running when the
  rehearsal stops it.
* Faults on the way: the worker node's raylet is killed mid-training and the node restarted; the
  submitting client is stopped, the job stopped, and the same command resubmitted; the MLflow
  server is stopped for seconds mid-run. Each must end in a finished run that resumed from its
  last checkpoint, or lost no metric.
* At the end, the tracking server holds every run's params, per-step metrics, checkpoint reference
  and pictures; PostgreSQL holds them, and no SQLite file exists anywhere.

With ``DVSA_REHEARSAL_REPORT=FILE`` the wall time of each job and what each fault cost (seconds
lost, steps redone) are written there as JSON (scripts/cluster_rehearsal.sh).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from local_cluster import RAY, LocalCluster, stop_tree
from run_checks import steps_per_epoch

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHARED = "/mnt/efs/dvsa"          # the shared volume in the README's commands and configs/vg.yaml
NODE_CPUS = 3                     # per node; a train worker asks for 2: one worker per node
JOB_TIMEOUT_S = 600
EPOCHS = 3                        # the rehearsal presets' train.epochs (the sweep: 1)
# the alignment job's (its command gets train.epochs=ALIGN_EPOCHS appended): it is stopped after its
# first checkpoint and must still have epochs left when the stop lands, at whatever load (with 3
# epochs one CI run saw the stop land after the last one)
ALIGN_EPOCHS = 5
BATCH = 4                         # their data.batch_size: a few steps per epoch, faults land mid-run


# --------------------------------------------------------------------------- the README's commands


def readme_jobs() -> list[list[str]]:
    """Every `ray job submit` command of README.md's "On a cluster" section, as argv lists."""
    text = README.read_text()
    section = text.split("\n## On a cluster\n", 1)[1].split("\n## ", 1)[0]
    commands, cur = [], ""
    for raw in section.splitlines():
        if not raw.startswith("    "):                  # code lines are indented blocks
            cur = ""
            continue
        line = re.split(r"\s{2,}#", raw[4:], maxsplit=1)[0].rstrip()   # a trailing "  # comment"
        cur = f"{cur} {line.rstrip(chr(92)).strip()}".strip()
        if line.endswith("\\"):
            continue
        if cur.startswith("ray job submit"):
            commands.append(shlex.split(cur))
        cur = ""
    return commands


def label(argv: list[str]) -> str:
    """A short name for a README job: module plus what tells it apart."""
    entry = argv[argv.index("--") + 1:]
    module = entry[entry.index("-m") + 1].removeprefix("jobs.")
    args = entry[entry.index("-m") + 2:]
    if module == "prepare":
        return f"prepare {args[0]}"
    if module == "train_caption":
        mode = next(a.split("=", 1)[1] for a in args if a.startswith("caption.mode="))
        return f"train_caption {mode}"
    if module == "evaluate":
        return f"evaluate {args[args.index('--checkpoint') + 1]}"
    return module


def test_the_readme_cluster_section_is_complete():
    """What the rehearsal runs is all there: prepare both datasets, train the three models,
    evaluate each by what MLflow calls it, a sweep and the comparison; every one through
    `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml`, every path absolute
    on the shared volume, none to edit."""
    jobs = readme_jobs()
    labels = [label(j) for j in jobs]
    assert labels[:5] == ["prepare vg", "prepare karpathy", "train_caption region", "train_caption fullframe",
                          "train_align"], labels
    assert sum(x.startswith("evaluate ") for x in labels) == 3 and labels[-2:] == ["tune", "compare"], labels
    for argv in jobs:
        assert argv[:8] == ["ray", "job", "submit", "--working-dir", ".", "--runtime-env",
                            "cluster/runtime_env.yaml", "--"], argv
        for a in argv:
            value = a.split("=", 1)[-1]
            assert not value.startswith(("runs/", "data/", "./")), (a, argv)
            assert "<" not in a and "RUN_ID" not in a, f"a placeholder to edit: {a}"
        paths = [a for a in argv if a.startswith("/")]
        assert all(p.startswith(SHARED + "/") for p in paths), paths
    evals = [a for j in jobs if label(j).startswith("evaluate ") for a in j[j.index("--checkpoint") + 1:][:1]]
    assert all(e.startswith(("models:/", "runs:/")) for e in evals), evals


# --------------------------------------------------------------------------- the rehearsal's world


def _preset(path: Path, base: str, sh: Path, extra: str = "", workers: int = 2, epochs: int = EPOCHS) -> Path:
    """A preset that extends a shipped one at test scale, with the shared volume at ``sh``."""
    path.write_text(f"""\
base: {REPO / 'configs' / base}
out: {sh}/runs
data:
  shards: {sh}/data/vg
  fullframe_shards: {sh}/data/coco
  image_size: 64
  max_regions: 8
  max_len: 12
  batch_size: {BATCH}
  val_batch_size: 16
  decode_concurrency: 1
  decode_batch_size: 16
  decode_pool: tasks
  prefetch_batches: 1
  max_val_images: 12
  shuffle_buffer: 32
model:
  backbone: tiny
  weights: null
  roi_size: 3
  embed_dim: 64
  word_dim: 32
  hidden_dim: 64
  dropout: 0.0
caption:
  decode: greedy
  max_regions_per_image: 4
train:
  epochs: {epochs}
  lr: 0.002
  optimizer: adam
  num_workers: {workers}
  cpus_per_worker: {2 if workers > 1 else 1}
  use_gpu: false
  amp: false
  channels_last: false
  compile: none
  cudnn_benchmark: false
  static_shapes: true             # vg.yaml's: the padded-slot step through Ray Train and DDP, on the CPU
  lr_scale_batch: 0
  storage_path: {sh}/ray_results
  log_every: 1
  checkpoint_every: 1
  max_failures: 3
{extra}""")
    return path


class Rehearsal:
    def __init__(self, tmp: Path, world: Path) -> None:
        self.tmp = tmp
        self.started = time.time()
        self.sh = tmp / "shared"                     # stands for /mnt/efs/dvsa
        self.report: dict = {"jobs": {}, "faults": {}}
        self.resumed_from: dict[str, int] = {}      # job -> the checkpoint's step a fault made it resume from
        raw = self.sh / "raw"
        raw.mkdir(parents=True)
        # The raw datasets as a user puts them on the volume: Visual Genome as downloaded (+ densecap's
        # split file), Karpathy's json with its images and the detector's proposals.
        (raw / "vg").symlink_to(world / "vg", target_is_directory=True)
        coco = raw / "coco"
        coco.mkdir()
        (coco / "dataset_coco.json").symlink_to(world / "karpathy" / "dataset_synth.json")
        (coco / "proposals.json").symlink_to(world / "karpathy" / "proposals.json")
        for d in (world / "vg").glob("VG_100K*"):
            (coco / d.name).symlink_to(d, target_is_directory=True)
        self.vg_preset = _preset(tmp / "rehearsal_vg.yaml", "vg.yaml", self.sh)
        self.tune_preset = _preset(tmp / "rehearsal_tune_vg.yaml", "tune_vg.yaml", self.sh, workers=1, epochs=1,
                                   extra="""\
tune:
  search: random
  num_samples: 2
  max_concurrent_trials: 2
  grace_period: 1
  cpus_per_trial: 1
  gpus_per_trial: 0
  time_budget_s: 900
  space:
    train.lr: {loguniform: [0.001, 0.004]}
    train.weight_decay: {loguniform: [1.0e-6, 1.0e-4]}
    model.embed_dim: {randint: [32, 64]}
    model.hidden_dim: {randint: [32, 64]}
    model.dropout: {uniform: [0.0, 0.2]}
""")
        self.jobs = {label(j): j for j in readme_jobs()}
        self.pending: dict[str, subprocess.Popen] = {}     # jobs running beside others, checked later
        self.server: TrackingScript | None = None
        self.cluster: LocalCluster | None = None

    def argv(self, name: str) -> list[str]:
        """The README's command with the three substitutions, token by token (and the alignment
        job's longer run, ALIGN_EPOCHS)."""
        subst = {"configs/vg.yaml": str(self.vg_preset), "configs/tune_vg.yaml": str(self.tune_preset)}
        out = []
        for a in self.jobs[name]:
            a = subst.get(a, a)
            a = a.replace(SHARED, str(self.sh))
            out.append(a)
        out[0] = RAY
        if name == "train_align":
            out.append(f"train.epochs={ALIGN_EPOCHS}")
        return out

    def run(self, name: str, timeout_s: float = JOB_TIMEOUT_S) -> tuple[str, str]:
        """Submit a README job and wait (`ray job submit` blocks); (submission id, its logs)."""
        assert self.cluster is not None
        t0 = time.time()
        res = self.cluster.cli(self.argv(name), cwd=REPO, timeout_s=timeout_s)
        sid = submission_id(res.stdout + res.stderr)
        logs = self.cluster.job_logs(sid) if sid else ""
        self.report["jobs"][name] = round(time.time() - t0, 1)
        assert res.returncode == 0 and self.cluster.job_status(sid) == "SUCCEEDED", (
            f"{name}: rc {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-3000:]}\n{self.cluster.logs()}")
        return sid, logs

    def progress(self, train_name: str) -> Path:
        return self.sh / "runs" / "jobs" / train_name / "progress"


def submission_id(output: str) -> str:
    m = re.search(r"Job '([^']+)' submitted successfully", output)
    return m.group(1) if m else ""


class TrackingScript:
    """cluster/mlflow_server.sh, as ray_cluster.yaml's head runs it, bound to 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        from local_cluster import free_port

        self.root = root
        self.env = {**os.environ, "DVSA_SHARED": str(root), "MLFLOW_HOST": "127.0.0.1",
                    "MLFLOW_PORT": str(free_port()), "PG_PORT": str(free_port()),
                    "PYTHON": sys.executable}
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.uri = f"http://127.0.0.1:{self.env['MLFLOW_PORT']}"

    def script(self, *args: str, timeout_s: float = 400, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        res = subprocess.run(["bash", str(REPO / "cluster" / "mlflow_server.sh"), *args], env=self.env,
                             capture_output=True, text=True, timeout=timeout_s)
        assert res.returncode in ok, f"mlflow_server.sh {' '.join(args)}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
        return res

    def pid(self) -> int:
        return int((self.root / "mlflow-server" / "mlflow.pid").read_text().split()[0])

    def query(self, sql: str, *args) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=int(self.env["PG_PORT"]), user="dvsa", dbname="mlflow")
        try:
            cur = conn.cursor()
            cur.execute(sql, args)
            return cur.fetchall()
        finally:
            conn.close()


def _have_postgres() -> bool:
    return all(shutil.which(t) for t in ("initdb", "pg_ctl", "postgres"))


@pytest.fixture(scope="module")
def rehearsal(synth_world):
    if not _have_postgres():
        pytest.fail("PostgreSQL 15 (initdb, pg_ctl, postgres) is needed: apt-get install postgresql (.ci/run does)")
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="dvsa-reh-", dir="/tmp"))
    os.chmod(tmp, 0o755)                 # PostgreSQL runs as its own user when we are root
    r = Rehearsal(tmp, synth_world)
    r.server = TrackingScript(r.sh)
    try:
        t = time.time()
        res = r.server.script("start")
        r.report["mlflow_server_start_s"] = round(time.time() - t, 1)
        assert f"MLFLOW_TRACKING_URI={r.server.uri}" in res.stdout.splitlines()
        assert "already running" in r.server.script("start").stdout       # idempotent
        assert r.server.query("SHOW listen_addresses") == [("127.0.0.1",)]
        t = time.time()
        # what ray_cluster.yaml exports before every `ray start` (+ where nodes cache downloaded models)
        env = {"MLFLOW_TRACKING_URI": r.server.uri, "DVSA_MODEL_CACHE": str(tmp / "model-cache")}
        r.cluster = LocalCluster(node_cpus=NODE_CPUS, env=env).start(workers=1)
        r.report["cluster_start_s"] = round(time.time() - t, 1)
        yield r
    finally:
        for proc in r.pending.values():
            stop_tree(proc)
        if r.cluster is not None:
            r.cluster.stop()
        if r.server is not None:
            subprocess.run(["bash", str(REPO / "cluster" / "mlflow_server.sh"), "stop"], env=r.server.env,
                           capture_output=True, timeout=120)
        r.report["wall_s"] = round(time.time() - t0, 1)
        dest = os.environ.get("DVSA_REHEARSAL_REPORT")
        if dest:
            Path(dest).write_text(json.dumps(r.report, indent=2) + "\n")
        print("\ncluster rehearsal:", json.dumps(r.report))
        if not os.environ.get("DVSA_REHEARSAL_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _run_of(r: Rehearsal, train_name: str):
    """The MLflow run a training job with ``train.name`` logged into (one, reopened on resume)."""
    c = _client(r.server.uri)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()],
                         filter_string=f"tags.`dvsa.train_name` = '{train_name}'")
    assert len(runs) == 1, [(x.info.run_name, x.info.run_id) for x in runs]
    return runs[0]


def _artifacts(c, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of a run, recursively."""
    out: set[str] = set()
    for f in c.list_artifacts(run_id, path):
        out |= _artifacts(c, run_id, f.path) if f.is_dir else {f.path}
    return out


def _attempts(progress: Path) -> list[dict]:
    f = progress / "attempts.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []


def _rank0(progress: Path) -> dict:
    try:
        return json.loads((progress / "rank0.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _registered_steps(run_dir: Path) -> list[int]:
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [int(x["metrics"]["step"]) for x in snap.get("checkpoint_results", [])]


def _train_name(argv: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith("train.name="))


def _background(r: Rehearsal, name: str, log: Path) -> subprocess.Popen:
    assert r.cluster is not None
    return r.cluster.popen(r.argv(name), cwd=REPO, log=log)


def _wait_for(what: str, cond, proc: subprocess.Popen | None = None, timeout_s: float = 400) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job's client ended before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- the rehearsal, in order


def test_token_auth_guards_the_job_api(rehearsal):
    """The job API refuses a request without the token and one with a wrong token."""
    import urllib.error

    assert len(rehearsal.cluster.alive_nodes()) == 2
    for bad in (None, "0" * 64):
        with pytest.raises(urllib.error.HTTPError) as e:
            rehearsal.cluster.api("/api/jobs/", token=bad)
        assert e.value.code in (401, 403)
    # and a node with a wrong token is refused (it runs beside the next jobs: a refusal takes seconds)
    cl = rehearsal.cluster
    env = {**cl.env, "RAY_AUTH_TOKEN": "0" * 64}
    tmp = rehearsal.tmp / "intruder"
    tmp.mkdir()
    rehearsal.pending["intruder"] = subprocess.Popen(
        [RAY, "start", f"--address=127.0.0.1:{cl.gcs_port}", "--num-cpus=1", f"--temp-dir={tmp}",
         "--disable-usage-stats"], env=env, cwd=tmp, stdout=open(tmp / "log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)


def test_prepare_writes_the_shards_onto_the_shared_volume(rehearsal):
    r = rehearsal
    for name in ("prepare vg", "prepare karpathy"):
        r.run(name)
    for d in ("vg", "coco"):
        m = json.loads((r.sh / "data" / d / "manifest.json").read_text())
        assert m["splits"]["train"]["images"] > 0 and list((r.sh / "data" / d).glob("train-*.tar")), m


def test_a_node_without_the_token_cannot_join(rehearsal):
    r = rehearsal
    intruder = r.pending.pop("intruder")
    rc = intruder.wait(120)
    assert rc != 0, (r.tmp / "intruder" / "log").read_text()[-3000:]
    assert len(r.cluster.alive_nodes()) == 2


def test_region_captioner_survives_losing_the_worker_node(rehearsal):
    """2 workers, one per node. Once a checkpoint is registered, the worker node's raylet is
    SIGKILLed (the node is lost with its workers) and a fresh node joins: the job finishes,
    resumed from its last checkpoint, in one MLflow run."""
    r = rehearsal
    argv = r.jobs["train_caption region"]
    name = _train_name(argv)
    progress, run_dir = r.progress(name), r.sh / "ray_results" / name
    t0 = time.time()
    client = _background(r, "train_caption region", r.tmp / "region-client.log")
    try:
        _wait_for("a registered checkpoint", lambda: _registered_steps(run_dir), client)
        killed_at = time.time()
        r.cluster.kill_worker_node()
        at_kill = _rank0(progress)                   # read after: the most that was trained
        time.sleep(3)
        r.cluster.add_worker()                       # the autoscaler's replacement node
        client.wait(JOB_TIMEOUT_S)
    finally:
        if client.poll() is None:
            client.kill()
    out = (r.tmp / "region-client.log").read_text()
    sid = submission_id(out)
    assert client.returncode == 0 and r.cluster.job_status(sid) == "SUCCEEDED", out[-8000:]
    r.report["jobs"]["train_caption region"] = round(time.time() - t0, 1)

    attempts = _attempts(progress)
    first = [a for a in attempts if not a["resumed"]]
    again = [a for a in attempts if a["resumed"]]
    assert sorted(a["rank"] for a in first) == [0, 1] and sorted(a["rank"] for a in again) == [0, 1], attempts
    resumed_step = again[0]["start_step"]
    per_rank = steps_per_epoch(r.sh / "data" / "vg", BATCH, workers=2)
    assert 1 <= again[0]["start_epoch"] and resumed_step == again[0]["start_epoch"] * per_rank
    assert resumed_step in _registered_steps(run_dir) and resumed_step <= at_kill["step"]
    first_after = min(float(m.timestamp) / 1000 for m in _client(r.server.uri).get_metric_history(
        _run_of(r, name).info.run_id, "train/worker_start") if m.value == 2.0)
    r.report["faults"]["worker node lost (its processes SIGKILLed, node replaced)"] = {
        "step_at_kill": at_kill["step"], "resumed_from_step": resumed_step,
        "steps_redone": at_kill["step"] - resumed_step,
        "seconds_to_resume": round(first_after - killed_at, 1)}
    r.resumed_from["train_caption region"] = resumed_step

    run = _run_of(r, name)
    assert run.info.status == "FINISHED" and run.data.tags["dvsa.worker_starts"] == "2"
    assert (run.data.metrics["final/step"], run.data.metrics["final/epoch"]) == (EPOCHS * per_rank, EPOCHS)
    # the workers ran on both nodes: the head and a worker node (the replacement after the loss)
    actors = r.cluster.api("/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker" and a["pid"] in {x["pid"] for x in again}]
    assert len({a["node_id"] for a in workers}) == 2, workers


def test_fullframe_captioner_logs_through_a_tracking_server_outage(rehearsal):
    """The MLflow server stops for seconds mid-run and comes back: training goes on, and the
    metrics logged meanwhile arrive (none dropped)."""
    r = rehearsal
    name = _train_name(r.jobs["train_caption fullframe"])
    progress = r.progress(name)
    t0 = time.time()
    client = _background(r, "train_caption fullframe", r.tmp / "ff-client.log")
    try:
        _wait_for("step 2", lambda: _rank0(progress).get("step", 0) >= 2, client)
        down = time.time()
        step_down = _rank0(progress)["step"]
        pid = r.server.pid()
        r.server.script("stop")                      # the server and its database go away...
        assert not Path(f"/proc/{pid}").exists()
        assert r.server.script("status", ok=(3,)).returncode == 3
        time.sleep(3)
        r.server.script("start")                     # ... and come back, with what they held
        up = time.time()
        step_up = _rank0(progress).get("step", 0)
        client.wait(JOB_TIMEOUT_S)
    finally:
        if client.poll() is None:
            client.kill()
    out = (r.tmp / "ff-client.log").read_text()
    assert client.returncode == 0 and r.cluster.job_status(submission_id(out)) == "SUCCEEDED", out[-5000:]
    r.report["jobs"]["train_caption fullframe"] = round(time.time() - t0, 1)
    r.report["faults"]["tracking server (mlflow + PostgreSQL) stopped mid-run"] = {
        "server_down_s": round(up - down, 1), "steps_trained_while_down": step_up - step_down,
        "steps_redone": 0}

    run = _run_of(r, name)
    c = _client(r.server.uri)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, int(run.data.metrics["final/step"]) + 1))
    assert step_up > step_down or steps[-1] > step_down      # it trained on while the server was away
    assert "mlflow/dropped_metrics" not in run.data.metrics


def test_alignment_model_resumes_when_resubmitted(rehearsal):
    """The submitting client dies (Ctrl-C): the job goes on without it. The user stops the job
    (`ray job stop`: its run ends KILLED) and submits the same command again: it resumes from the
    last checkpoint, into the same MLflow run."""
    r = rehearsal
    name = _train_name(r.jobs["train_align"])
    progress, run_dir = r.progress(name), r.sh / "ray_results" / name
    log = r.tmp / "align-client.log"
    t0 = time.time()
    client = _background(r, "train_align", log)
    try:
        _wait_for("a registered checkpoint", lambda: _registered_steps(run_dir), client)
        client.send_signal(signal.SIGINT)            # Ctrl-C on `ray job submit`
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
    sid = submission_id(log.read_text())
    assert r.cluster.job_status(sid) == "RUNNING"    # the job does not die with its client
    stopped_at = _rank0(progress)
    t_stop = time.time()
    res = r.cluster.cli([RAY, "job", "stop", sid], cwd=REPO, timeout_s=120)
    assert res.returncode == 0, res.stdout + res.stderr
    _wait_for("the job to stop", lambda: r.cluster.job_status(sid) in ("STOPPED", "FAILED"), timeout_s=120)
    stopped_in_s = round(time.time() - t_stop, 1)
    final_step = ALIGN_EPOCHS * steps_per_epoch(r.sh / "data" / "coco", BATCH, workers=2)
    last_before = max(_registered_steps(run_dir))
    assert last_before < final_step, "the job ended before it was stopped: nothing left to resume"
    assert _run_of(r, name).info.status == "KILLED"
    assert "dvsa train-align: terminated (SIGTERM)" in r.cluster.job_logs(sid)
    t_resubmit = time.time()
    r.run("train_align")
    attempts = _attempts(progress)
    resumed = [a for a in attempts if a["resumed"]]
    assert sorted(a["rank"] for a in resumed) == [0, 1], attempts
    # from the last checkpoint the stopped job registered: nothing before it is redone
    assert resumed[0]["start_step"] == last_before, (attempts, last_before)
    r.report["jobs"]["train_align"] = round(time.time() - t0, 1)
    r.report["faults"]["client stopped, job stopped, resubmitted"] = {
        "step_at_stop": stopped_at.get("step"), "resumed_from_step": last_before,
        "steps_redone": max(0, stopped_at.get("step", 0) - last_before), "job_stop_s": stopped_in_s,
        "resubmitted_job_s": round(time.time() - t_resubmit, 1)}
    r.resumed_from["train_align"] = last_before
    run = _run_of(r, name)
    assert run.info.status == "FINISHED" and run.data.metrics["final/step"] == final_step
    assert run.data.tags["dvsa.worker_starts"] == "2"


def test_each_model_is_evaluated_by_its_mlflow_name(rehearsal):
    """The three evaluations run side by side (as a user may submit them), and beside them the
    job that cannot be placed (checked below)."""
    r = rehearsal
    too_large = r.argv("train_align") + ["train.num_workers=4", "train.start_timeout_s=4", "train.name=too-large"]
    r.pending["too-large"] = r.cluster.popen(too_large, cwd=REPO, log=r.tmp / "too-large.log")
    t0 = time.time()
    clients = {name: _background(r, name, r.tmp / f"{name.replace('/', '_').replace(':', '_')}.log")
               for name in r.jobs if name.startswith("evaluate ")}
    for name, client in clients.items():
        rc = client.wait(JOB_TIMEOUT_S)
        out = (r.tmp / f"{name.replace('/', '_').replace(':', '_')}.log").read_text()
        assert rc == 0 and r.cluster.job_status(submission_id(out)) == "SUCCEEDED", out[-5000:]
    r.report["jobs"]["evaluate x3 (side by side)"] = round(time.time() - t0, 1)
    c = _client(r.server.uri)
    for mode in ("region", "fullframe"):
        run = _run_of(r, _train_name(r.jobs[f"train_caption {mode}"]))
        metrics = c.get_run(run.info.run_id).data.metrics
        assert 0 < metrics["region/METEOR"] <= 1, sorted(metrics)
    align = c.get_run(_run_of(r, _train_name(r.jobs["train_align"])).info.run_id).data.metrics
    assert any(k.startswith("retrieval/") for k in align), sorted(align)


_PYFUNC_SCORE = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"image": [sys.argv[2]], "sentence": [sys.argv[3]]}))
print(json.dumps(out["score"].tolist()))
"""


def test_a_fresh_process_loads_a_model_from_the_tracking_server(rehearsal, capsys):
    """`mlflow.pyfunc.load_model("models:/vg-align/latest")` in a new process that knows only the
    server's address scores an image-sentence pair as the checkpoint on the volume does; an unknown
    model name is one line naming the server."""
    import torch

    from dvsa.cli import main
    from dvsa.data.shards import iter_samples
    from dvsa.inference.alignment import embed_images
    from dvsa.inference.checkpoints import load_trained
    from dvsa.ingest.samples import encode_words

    r = rehearsal
    name = _train_name(r.jobs["train_align"])
    key, jpg, meta = next(iter_samples(str(r.sh / "data" / "coco"), "test"))
    image = r.tmp / f"{key}.jpg"
    image.write_bytes(jpg)
    sentence = " ".join(meta["sentences"][0]["tokens"])
    env = {**os.environ, "MLFLOW_TRACKING_URI": r.server.uri, "DVSA_MODEL_CACHE": str(r.tmp / "fresh-cache")}
    done = subprocess.run([sys.executable, "-c", _PYFUNC_SCORE, f"models:/{name}/latest", str(image), sentence],
                          capture_output=True, text=True, env=env, cwd=r.tmp, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (score,) = json.loads(done.stdout.strip().splitlines()[-1])

    model, vocab, cfg = load_trained(_run_of(r, name).data.tags["dvsa.checkpoint"])
    w, h = meta["width"], meta["height"]
    v, v_mask = embed_images(model, [jpg], [[[0, 0, w, h]]], cfg.data.image_size)
    ids, n = encode_words(vocab, sentence.split(), cfg.data.max_len)   # its first data.max_len words
    with torch.no_grad():
        s, s_mask = model.embed_words(torch.from_numpy(ids)[None], torch.tensor([n]))
        assert score == pytest.approx(float(model.scores(v, v_mask, s, s_mask)[0, 0]), rel=1e-5, abs=1e-6)

    os.environ["MLFLOW_TRACKING_URI"] = r.server.uri
    try:
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", "models:/nope/latest", f"out={r.tmp / 'nope'}"]) == 1
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert capsys.readouterr().err == (f"dvsa evaluate: error: --checkpoint models:/nope/latest: no such registered "
                                       f"model 'nope' in {r.server.uri}\n")


def test_a_sweep_runs_as_one_job(rehearsal):
    r = rehearsal
    argv = r.jobs["tune"]
    sweep = argv[argv.index("--name") + 1]
    r.run("tune")
    c = _client(r.server.uri)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()],
                         filter_string=f"tags.`dvsa.sweep` = '{sweep}'")
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId")]
    parents = {x.info.run_id for x in runs} - {x.info.run_id for x in children}
    assert len(parents) == 1 and len(children) == 2, [(x.info.run_name, x.data.tags) for x in runs]
    assert all(x.data.tags["mlflow.parentRunId"] in parents and "val/rsum" in x.data.metrics for x in children)
    assert (r.sh / "runs" / "sweeps" / sweep / "best_config.yaml").is_file()


def test_compare_reads_table5_back_from_the_tracking_server(rehearsal):
    r = rehearsal
    _, logs = r.run("compare")
    c = _client(r.server.uri)
    for mode in ("region", "fullframe"):
        run = c.get_run(_run_of(r, _train_name(r.jobs[f"train_caption {mode}"])).info.run_id)
        meteor = run.data.metrics["region/METEOR"]
        row = re.search(rf"^\| {mode} \| lstm \| ([0-9.]+) \|.*{run.info.run_id}", logs, re.M)
        assert row and float(row.group(1)) == pytest.approx(meteor, abs=1e-4), logs[-3000:]


def test_a_job_the_cluster_cannot_place_ends_naming_what_is_missing(rehearsal):
    """4 workers x 2 CPUs, more than the two nodes have: a joined cluster might grow (autoscaler), so
    the job waits train.start_timeout_s, then fails in one line naming the request and the
    cluster, instead of Ray Train's endless retry."""
    r = rehearsal
    client = r.pending.pop("too-large")
    rc = client.wait(300)
    sid = submission_id((r.tmp / "too-large.log").read_text())
    assert rc != 0 and r.cluster.job_status(sid) == "FAILED"
    logs = r.cluster.job_logs(sid)
    assert re.search(r"dvsa train-align: error: train.start_timeout_s=4: the cluster could not place 4 "
                     r"worker\(s\) of \{CPU 2\} in time; its 2 node\(s\) have CPU \d+ \| CPU \d+ ", logs), logs[-3000:]


def test_the_tracking_server_holds_every_run_in_postgres(rehearsal):
    """Each training run holds its params, per-step metrics, checkpoint reference, model and
    pictures; PostgreSQL (not any SQLite file) holds them; the artifacts are on the shared volume."""
    r = rehearsal
    c = _client(r.server.uri)
    for key in ("train_caption region", "train_caption fullframe", "train_align"):
        name = _train_name(r.jobs[key])
        run = _run_of(r, name)
        rid = run.info.run_id
        assert run.data.params["train.name"] == name and run.data.params["train.num_workers"] == "2"
        steps = sorted(m.step for m in c.get_metric_history(rid, "train/loss"))
        assert sorted(set(steps)) == list(range(1, int(run.data.metrics["final/step"]) + 1)), (key, steps)
        # a step trained again after a fault (one done after the checkpoint resumed from) is logged
        # again; no step up to that checkpoint is, and a job without a fault logs each step once
        twice = {s for s in steps if steps.count(s) > 1}
        assert max(map(steps.count, steps)) <= 2, (key, steps)
        assert not twice or (key in r.resumed_from and min(twice) > r.resumed_from[key]), (key, steps)
        assert run.data.tags["dvsa.checkpoint"].startswith(str(r.sh / "ray_results" / name))
        arts = _artifacts(c, rid)
        assert {"checkpoint.json", "config.yaml", "vocab.json", "plots/loss_curves.png"} <= arts, arts
        pictures = {a for a in arts if a.endswith(".png") and not a.startswith("plots/")}
        assert pictures, arts                 # captioned regions / the alignment figure (train or evaluate)
        # the model: logged with the run, registered under the train name, loadable from the server
        assert run.data.tags["dvsa.model_uri"] == f"runs:/{rid}/model"
        assert run.data.tags["dvsa.registered_model"].startswith(f"models:/{name}/")
        version = run.data.tags["dvsa.registered_model"].rsplit("/", 1)[1]
        assert c.get_model_version(name, version).run_id == rid
        (n,) = r.server.query("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss'", rid)[0]
        assert n >= len(steps)
        assert r.server.query("SELECT value FROM params WHERE run_uuid = %s AND key = 'train.name'", rid) == [(name,)]
    assert list((r.sh / "mlflow-artifacts").rglob("loss_curves.png"))
    # no SQLite store anywhere: not on the volume, not in the working dir the jobs were submitted from
    assert not list(r.tmp.rglob("*.db"))
    assert not [p for p in REPO.glob("*.db") if p.stat().st_mtime >= r.started]
