"""A real MLflow tracking server for tests: PostgreSQL 15 (``initdb`` + ``pg_ctl`` in a temp
dir, on 127.0.0.1) as the backend store, ``mlflow server`` on 127.0.0.1 with an artifact root
on a directory that stands for the shared volume. What a team runs on a cluster, on one machine.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user (which the
PostgreSQL packages create), in a directory it owns.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

PG_USER = "dvsa"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def have_postgres() -> bool:
    return all(shutil.which(t) for t in ("initdb", "pg_ctl", "postgres"))


@dataclass
class TrackingServer:
    root: Path
    pg_port: int = field(default_factory=free_port)
    port: int = field(default_factory=free_port)
    proc: Optional[subprocess.Popen] = None

    @property
    def pgdata(self) -> Path:
        return self.root / "pg" / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.pg_port}/mlflow"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> Path:
        return self.root / "shared" / "mlflow-artifacts"

    # ------------------------------------------------------------------ PostgreSQL
    def start_postgres(self) -> None:
        pg = self.root / "pg"
        pg.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(pg, "postgres", "postgres")
        subprocess.run(_as_postgres(["initdb", "-D", str(self.pgdata), "-A", "trust", "-U", PG_USER]),
                       check=True, capture_output=True)
        opts = f"-c listen_addresses=127.0.0.1 -p {self.pg_port} -k {pg}"
        subprocess.run(_as_postgres(["pg_ctl", "-D", str(self.pgdata), "-o", opts, "-l", str(pg / "log"),
                                     "-w", "start"]), check=True, capture_output=True)
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user=PG_USER, dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()

    def stop_postgres(self) -> None:
        subprocess.run(_as_postgres(["pg_ctl", "-D", str(self.pgdata), "-m", "fast", "stop"]),
                       capture_output=True)

    def query(self, sql: str, *args) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user=PG_USER, dbname="mlflow")
        try:
            cur = conn.cursor()
            cur.execute(sql, args)
            return cur.fetchall()
        finally:
            conn.close()

    # ------------------------------------------------------------------ MLflow server
    def start_mlflow(self, timeout_s: float = 300) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "mlflow-server.log", "ab")
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.dsn,
             "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'mlflow-server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not answer in time")

    def stop_mlflow(self) -> None:
        if self.proc is None:
            return
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None

    def start(self) -> "TrackingServer":
        self.start_postgres()
        self.start_mlflow()
        return self

    def stop(self) -> None:
        self.stop_mlflow()
        self.stop_postgres()
