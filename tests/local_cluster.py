"""A Ray cluster of separate nodes on this one machine, started the way a user starts a real one.

`ray start --head` plus one `ray start --address` per worker node, each with its own temp dir
and resources, token auth on (RAY_AUTH_MODE=token and a token of the cluster's own in
RAY_AUTH_TOKEN), the dashboard bound to 127.0.0.1; jobs go in through `ray job submit`.
Environment given to :class:`LocalCluster` (e.g. ``MLFLOW_TRACKING_URI``) is exported before
every `ray start`, as ray_cluster.yaml's start commands export it, so every job driver and
worker inherits it. Only the processes this module started are stopped (by PID and process
group); never `ray stop`, which would kill other users' Ray.
"""

from __future__ import annotations

import json
import os
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
from typing import Mapping, Optional

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
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
        parent_of[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent_of.items() if pp == p]
        out.extend(kids)
        frontier.extend(kids)
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL: ``proc``, its process group and every descendant we can see."""
    pids = [proc.pid] + children(proc.pid)
    try:
        pgid: Optional[int] = os.getpgid(proc.pid)
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
        while time.time() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
        if not any(alive(p) for p in pids):
            return


class LocalCluster:
    """A head node and ``workers`` worker nodes, each advertising ``node_cpus`` CPUs."""

    def __init__(self, node_cpus: int = 3, env: Optional[Mapping[str, str]] = None,
                 object_store_bytes: int = 150_000_000) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="dvsa-cl-", dir="/tmp"))   # socket paths: keep it short
        self.node_cpus = node_cpus
        self.object_store_bytes = object_store_bytes
        self.gcs_port = free_port()
        self.dash_port = free_port()
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
        self.env.update(env or {})
        self.head: Optional[subprocess.Popen] = None
        self.workers: list[subprocess.Popen] = []
        self._started: list[subprocess.Popen] = []
        self._worker_starts = 0

    # ------------------------------------------------------------------ nodes
    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    def _ray_start(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.tmp / log, "wb")
        proc = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", f"--num-cpus={self.node_cpus}",
             "--num-gpus=0", f"--object-store-memory={self.object_store_bytes}",
             f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", *args],
            env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=self.tmp,
        )
        self._started.append(proc)
        return proc

    def start(self, workers: int = 1) -> "LocalCluster":
        self.head = self._ray_start(
            ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dash_port}", f"--ray-client-server-port={free_port()}",
             f"--temp-dir={self.tmp / 'ray'}"],
            "head.log",
        )
        self.wait_nodes(1)
        for _ in range(workers):
            self.add_worker()
        return self

    def add_worker(self) -> subprocess.Popen:
        """One more worker node. Each gets a temp dir of its own: two raylets on one machine sharing
        one would both unpack the job's working_dir package into the same runtime_resources
        folder, and one's unpacking races the other's imports (seen as a ModuleNotFoundError)."""
        self._worker_starts += 1
        n = self._worker_starts
        before = len(self.alive_nodes())
        proc = self._ray_start([f"--address=127.0.0.1:{self.gcs_port}", f"--temp-dir={self.tmp / f'ray-w{n}'}"],
                               f"worker{n}.log")
        self.workers.append(proc)
        self.wait_nodes(before + 1)
        return proc

    def kill_worker_node(self, index: int = 0) -> int:
        """Lose worker node ``index`` as a machine is lost: SIGKILL its raylet and every process
        under it (its workers included) at once. Returns the raylet's pid. (The process tree is
        read before anything dies: a worker whose raylet is gone is re-parented and would be
        missed, and such a worker keeps training until it notices.)"""
        proc = self.workers.pop(index)
        tree = children(proc.pid)
        raylets = [p for p in tree if comm(p) == "raylet"]
        assert raylets, f"no raylet under ray start pid {proc.pid}"
        for pid in [*raylets, *tree, proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        stop_tree(proc, grace_s=2.0)
        return raylets[0]

    def api(self, path: str, token: Optional[str] = "own") -> dict:
        req = urllib.request.Request(self.dashboard + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {self.token if token == 'own' else token}")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> list[dict]:
        try:
            data = self.api("/api/v0/nodes?limit=100")
        except OSError:
            return []
        return [n for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_nodes(self, n: int, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for p in [self.head, *self.workers]:
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"ray start exited with {p.returncode}:\n{self.logs()}")
            if len(self.alive_nodes()) >= n:
                return
            time.sleep(1.0)
        raise TimeoutError(f"{n} Ray node(s) not alive after {timeout_s}s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.tmp.glob("*.log")))

    # ------------------------------------------------------------------ jobs
    def cli(self, args: list[str], cwd: Path, timeout_s: float = 600) -> subprocess.CompletedProcess:
        """A `ray ...` command line as a user types it, against this cluster's dashboard."""
        env = {**self.env, "RAY_ADDRESS": self.dashboard}
        return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)

    def popen(self, args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
        env = {**self.env, "RAY_ADDRESS": self.dashboard}
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def submit(self, entrypoint: list[str], submission_id: str, cwd: Path,
               runtime_env: list[str], timeout_s: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit` (blocks, streams the job's logs)."""
        return self.cli([RAY, "job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
                         *runtime_env, "--", *entrypoint], cwd=cwd, timeout_s=timeout_s)

    def job(self, submission_id: str) -> dict:
        return self.api(f"/api/jobs/{submission_id}")

    def job_status(self, submission_id: str) -> str:
        return self.job(submission_id)["status"]

    def job_logs(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}/logs")["logs"]

    def stop(self) -> None:
        for p in reversed(self._started):
            stop_tree(p)
        shutil.rmtree(self.tmp, ignore_errors=True)
