"""What an embedded local Ray (dvsa.runtime.ray_session) listens on: loopback only.

One Ray start through dvsa's own code; the TCP listening sockets of every process it started
(GCS, raylet, dashboard, autoscaler monitor, dashboard and runtime env agents, workers, and the
driver's own core worker) are read from /proc, named by the ports Ray reports, and each is
asked ``GET /metrics``; a second process joins the Ray by its loopback address. A listener on a
non-loopback address fails the test unless its role is in :data:`NON_LOOPBACK`; a tokenless
Prometheus endpoint fails it unless listed in :data:`TOKENLESS`.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dvsa import runtime

pytestmark = pytest.mark.ray

# Roles that Ray 2.60 cannot bind to loopback in an embedded Ray, with the reason. None: with the
# node IP on loopback (runtime.loopback_ray) every server binds 127.0.0.1. A Ray upgrade that
# binds one to the host IP or 0.0.0.0 again fails the test until it is fixed or listed here.
NON_LOOPBACK: dict[str, str] = {}

# Loopback endpoints that answer GET /metrics without a token and that Ray 2.60 cannot turn off.
# Each runs on a fixed port (env AUTOSCALER_METRIC_PORT / DASHBOARD_METRIC_PORT), which another
# Ray on the machine may hold already (then this Ray goes without it): checked only when free.
TOKENLESS = {
    "autoscaler metrics": "autoscaler/_private/monitor.py Monitor.__init__ calls prometheus_client."
                          "start_http_server whenever it has a --monitor-ip, which node.py start_monitor always passes",
    "dashboard metrics": "dashboard/head.py DashboardHead._setup_metrics starts it whenever prometheus_client imports",
}

_LISTEN = "0A"

# run in a second process: join the Ray at argv[1] through dvsa, print where a task ran
_JOIN = """
import sys, ray
from dvsa import runtime
with runtime.ray_session(None, address=sys.argv[1]) as info:
    assert info["mode"] == "joined", info
    print(ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote()))
"""


def _addr(hexaddr: str) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))    # four host-order u32s
    return socket.inet_ntop(socket.AF_INET6, words), int(port, 16)


def tcp_listeners() -> dict[str, tuple[str, int]]:
    """Every listening TCP socket on the machine: inode -> (address, port)."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == _LISTEN:
                    out[cols[9]] = _addr(cols[1])
    return out


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(root: int) -> set[int]:
    kids, seen, todo = _children(), set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(kids.get(pid, ()))
    return seen


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.strip()
    for arg in argv[:4]:       # python [-u] .../dashboard.py, .../monitor.py, a binary's own path
        name = os.path.basename(arg.decode(errors="replace"))
        if name and not name.startswith(("python", "-")):
            return name
    return os.path.basename(first)


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def tokenless_metrics(address: str, port: int) -> bool:
    """Whether ``GET /metrics`` answers 200 with Prometheus text, without credentials."""
    host = "127.0.0.1" if address in ("0.0.0.0", "::") else address.removeprefix("::ffff:")
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read(4096)
        return resp.status == 200 and (body.startswith(b"# HELP") or body.startswith(b"# TYPE"))
    except (OSError, http.client.HTTPException):
        return False              # gRPC servers answer HTTP/1.1 with an HTTP/2 frame
    finally:
        conn.close()


def port_roles() -> dict[int, str]:
    """Port -> role, from what the running Ray reports about itself."""
    import ray
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    node = ray._private.worker._global_node
    info = next(n for n in ray.nodes() if n["Alive"])
    roles = {
        int(node.gcs_address.rsplit(":", 1)[1]): "GCS",
        info["NodeManagerPort"]: "raylet node manager",
        info["ObjectManagerPort"]: "object manager",
        info["MetricsAgentPort"]: "dashboard agent gRPC",
        info["DashboardAgentListenPort"]: "dashboard agent HTTP",
        info["RuntimeEnvAgentPort"]: "runtime env agent",
        AUTOSCALER_METRIC_PORT: "autoscaler metrics",
        DASHBOARD_METRIC_PORT: "dashboard metrics",
    }
    if info["MetricsExportPort"] and info["MetricsExportPort"] > 0:
        roles[info["MetricsExportPort"]] = "metrics export (Prometheus)"
    api = os.environ.get(runtime.API_SERVER_ENV)
    if api:
        roles[int(api.rsplit(":", 1)[1])] = "dashboard"
    return roles


def session_listeners(before_pids: set[int], before_inodes: set[str]) -> list[dict]:
    """The listening sockets of the processes Ray started since ``before_pids`` (descendants of
    this process) and those this process opened since ``before_inodes`` (its core worker)."""
    me = os.getpid()
    socks = tcp_listeners()
    roles = port_roles()
    rows = []
    for pid in sorted(descendants(me) - before_pids | {me}):
        inodes = socket_inodes(pid)
        if pid == me:
            inodes -= before_inodes
        name = "driver" if pid == me else process_name(pid)
        for inode in inodes & socks.keys():
            address, port = socks[inode]
            role = roles.get(port) or ("worker gRPC" if name.startswith("ray::") or pid == me else "unknown")
            rows.append({"pid": pid, "process": name, "address": address, "port": port, "role": role})
    for row in rows:
        row["tokenless_metrics"] = tokenless_metrics(row["address"], row["port"])
    return sorted(rows, key=lambda r: (r["role"], r["port"], r["address"]))


def _fixed_metric_ports() -> dict[str, int]:
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    return {"autoscaler metrics": AUTOSCALER_METRIC_PORT, "dashboard metrics": DASHBOARD_METRIC_PORT}


def _wait_for(roles: set[str], before_pids, before_inodes, timeout_s: float = 15) -> list[dict]:
    """The session's listeners once every role in ``roles`` listens and each fixed metrics port
    is held, by this Ray or another one (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = session_listeners(before_pids, before_inodes)
        held = {port for _, port in tcp_listeners().values()}
        if (roles <= {r["role"] for r in rows} and set(_fixed_metric_ports().values()) <= held) \
                or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _answers(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except OSError:
        return False


def test_embedded_ray_listens_on_loopback_only(monkeypatch):
    import ray
    from ray._common.network_utils import node_ip_address_from_perspective

    assert not ray.is_initialized(), "a Ray is already up in this process: ray_session would reuse it"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(runtime.API_SERVER_ENV, raising=False)
    host_ip = node_ip_address_from_perspective(None)      # the address other machines reach
    me = os.getpid()
    before_pids, before_inodes = descendants(me), socket_inodes(me)
    expected = {"GCS", "raylet node manager", "object manager", "dashboard agent gRPC",
                "dashboard agent HTTP", "runtime env agent", "dashboard", "worker gRPC"}
    with runtime.ray_session(None, num_cpus=1) as info:
        assert info["mode"] == "local"
        assert ray.get(ray.remote(lambda: 1).remote()) == 1                # a worker is up
        rows = _wait_for(expected, before_pids, before_inodes)
        node_ip = ray._private.worker._global_node.node_ip_address
        metrics_export_port = next(n for n in ray.nodes() if n["Alive"])["MetricsExportPort"]
        on_host_ip = sorted({r["port"] for r in rows if not is_loopback(host_ip) and _answers(host_ip, r["port"])})
        # another dvsa process joins it by its loopback GCS address (Ray alone would try the host IP)
        here = str(Path(runtime.__file__).parents[1])                    # the dvsa under test
        try:
            joiner = subprocess.run([sys.executable, "-c", _JOIN, ray.get_runtime_context().gcs_address],
                                    cwd=here, env={**os.environ, "PYTHONPATH": here}, capture_output=True,
                                    text=True, timeout=60)
            joined = (joiner.returncode, joiner.stdout, joiner.stderr)
        except subprocess.TimeoutExpired as e:                 # Ray retries an unreachable GCS forever
            joined = ("timed out after 60 s", str(e.stdout), str(e.stderr))
    table = "\n".join(f"{r['process']:>28} {r['address']:>18}:{r['port']:<6} {r['role']}"
                      f"{' (GET /metrics answers without a token)' if r['tokenless_metrics'] else ''}"
                      for r in rows)
    assert joined[0] == 0 and joined[1].split()[-1:] == ["127.0.0.1"], \
        f"joining by the loopback address: {joined[0]}\n{joined[1][-2000:]}\n{joined[2][-3000:]}"
    roles = {r["role"] for r in rows}
    assert expected <= roles, f"missing {expected - roles}:\n{table}"
    assert "unknown" not in roles, table
    non_loopback = {r["role"] for r in rows if not is_loopback(r["address"])}
    assert non_loopback == set(NON_LOOPBACK), f"listening beyond loopback: {non_loopback}\n{table}"
    assert node_ip == "127.0.0.1"
    if not NON_LOOPBACK:
        assert on_host_ip == [], f"ports answering on {host_ip}: {on_host_ip}\n{table}"
    # the dashboard agent's Prometheus exporter is off: no port, and no listener answering as one
    assert metrics_export_port <= 0 and "metrics export (Prometheus)" not in roles, table
    tokenless = {r["role"] for r in rows if r["tokenless_metrics"]}
    assert tokenless <= set(TOKENLESS), f"unexpected tokenless /metrics: {tokenless - set(TOKENLESS)}\n{table}"
    held = {port for _, port in tcp_listeners().values()}       # after shutdown: other Rays' only
    for role, port in _fixed_metric_ports().items():
        # a listed one this Ray no longer opens although its port is free: Ray can turn it off now
        assert role in tokenless or port in held, f"{role} (port {port}) is gone: drop it from TOKENLESS\n{table}"
