"""Process environment and the Ray a job runs on.

With no cluster address (``ray.address`` in the config, or ``RAY_ADDRESS``) a job starts an
embedded local Ray whose temp dir (sessions, logs, spilled objects) lives inside the job's
output dir; otherwise it joins the cluster. A Ray that this process already started (a test
fixture, a Tune driver) is reused and left running.

Ray puts Unix sockets under its temp dir and the kernel caps their paths at 107 bytes, so a
long output path gets a short ``/tmp/dvsa-ray-*`` dir instead, with a symlink
``<out>/ray-tmp`` pointing at it (and the reverse recorded in ``<out>/ray-tmp.txt``).

An embedded Ray listens on loopback only (:func:`loopback_ray`): its node IP is 127.0.0.1, so the
GCS, raylet, object manager, workers, agents and dashboard bind 127.0.0.1, and its Prometheus
metrics export (which answers without a token) is off. A joined cluster is left as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional

from dvsa.errors import raise_on_sigterm

log = logging.getLogger(__name__)

# Environment every dvsa process (driver and Ray workers) runs with.
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    # Ray Train's V2 controller prints progress itself; keep Ray Data's bars out of job logs
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # a tracking server that does not answer: MLflow retries each request 3 times within ~7 s
    # (its default, 7 retries with a back-off factor of 2, would stall training for minutes),
    # then dvsa.tracking.RunLogger keeps the metrics for its next send
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}

# Ray's session dir name + "/sockets/plasma_store" add ~63 characters to the temp dir.
_SOCKET_PATH_MAX = 107
_SESSION_SUFFIX = len("/session_2026-01-01_12-00-00_123456_1234567/sockets/plasma_store")
MAX_TEMP_DIR_LEN = _SOCKET_PATH_MAX - _SESSION_SUFFIX


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"

# ray.init(_system_config=...) of an embedded Ray: no Prometheus metrics export. The dashboard
# agent then opens no metrics export port (an HTTP /metrics that answers without a token) and
# workers record no metrics; dvsa reads none (its metrics go to MLflow).
LOCAL_SYSTEM_CONFIG = {"enable_metrics_collection": False}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_environment() -> dict[str, str]:
    """Set the quiet variables (without overriding the user's) and return them as set."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in QUIET_ENV}


def cluster_address(config_address: Optional[str] = None) -> Optional[str]:
    """The address to join: config first, then ``RAY_ADDRESS``; None means embedded local Ray."""
    addr = config_address or os.environ.get("RAY_ADDRESS") or None
    return addr.strip() if addr else None


def require_shared_paths(address: Optional[str], paths: Mapping[str, Optional[str]]) -> None:
    """On a joined cluster (``address`` / ``RAY_ADDRESS``), refuse in one line (ConfigError) a
    relative path among ``paths`` (config key -> value). Under ``ray job submit`` it would resolve
    inside the job's temporary working dir on the head node: shards there exist on no other node,
    and checkpoints there are gone when the job ends, so resubmitting the same ``train.name``
    could not resume. An embedded Ray (a laptop) keeps relative paths."""
    from dvsa.config import ConfigError

    joined = cluster_address(address)
    for key, value in paths.items() if joined else ():
        if value and "://" not in value and not os.path.isabs(value):
            raise ConfigError(
                f"{key}={value}: a relative path, but this job runs on the Ray cluster at {joined}, where it "
                f"would resolve inside the job's temporary working dir on one node; give an absolute path on "
                f"shared storage (e.g. /mnt/efs/dvsa/...) or a URL (s3://...)")


def warn_without_tracking_server(address: Optional[str], tracking_configured: Optional[str]) -> None:
    """On a joined cluster with neither ``MLFLOW_TRACKING_URI`` nor ``mlflow.tracking_uri``, warn:
    the default ``sqlite:///<out>/mlflow.db`` is a file on the driver's node that workers elsewhere
    cannot write and later jobs (``evaluate --checkpoint RUN_ID``, ``compare``) do not find. A
    warning, not a refusal: a one-machine ``ray start --head`` is a joined cluster too."""
    joined = cluster_address(address)
    if joined and not (os.environ.get("MLFLOW_TRACKING_URI") or tracking_configured):
        log.warning(
            "mlflow.tracking_uri: this job runs on the Ray cluster at %s with the default "
            "sqlite:///<out>/mlflow.db, a file on the driver's node: workers on other nodes cannot write it "
            "and later jobs (evaluate --checkpoint RUN_ID, compare) will not find it; set MLFLOW_TRACKING_URI "
            "to the team's tracking server", joined)


def ray_temp_dir(out: str | os.PathLike) -> str:
    """A temp dir for an embedded Ray: ``<out>/ray-tmp``, or a short symlinked one in /tmp."""
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    inside = out_dir / "ray-tmp"
    if inside.is_symlink():
        target = Path(os.readlink(inside))
        if target.is_dir() and len(str(target)) <= MAX_TEMP_DIR_LEN:
            return str(target)
        inside.unlink()
    if len(str(inside)) <= MAX_TEMP_DIR_LEN:
        inside.mkdir(exist_ok=True)
        return str(inside)
    short = tempfile.mkdtemp(prefix="dvsa-ray-", dir="/tmp")
    try:
        inside.symlink_to(short, target_is_directory=True)
    except OSError as e:  # e.g. a filesystem without symlinks: record the place instead
        log.warning("could not link %s -> %s: %s", inside, short, e)
    (out_dir / "ray-tmp.txt").write_text(short + "\n")
    return short


def is_loopback_address(address: str) -> bool:
    """Whether a GCS address ``host:port`` (no scheme) names this machine's loopback."""
    import ipaddress

    if "://" in address or ":" not in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def loopback_ray() -> Iterator[None]:
    """Around the ``ray.init`` that starts an embedded Ray: give the new node the IP 127.0.0.1.

    Ray 2.60 binds every server to 127.0.0.1 when the node IP is loopback; with the host IP (its
    default on Linux) the GCS, raylet, object manager and worker gRPC servers listen on ``::``,
    the dashboard agent's metrics export and the autoscaler and dashboard Prometheus servers on
    0.0.0.0, the runtime env agent and dashboard agent HTTP on the host IP.
    ``ray.init(_node_ip_address="127.0.0.1")`` does not help: ``services.resolve_ip_for_localhost``
    turns it back into the host IP. The node IP is loopback when ``ray_constants.ENABLE_RAY_CLUSTER``
    is false (``services.get_node_ip_address``), Ray's own default on macOS and Windows (env
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, read once at import, hence the flag itself). Only the
    driver picks the node IP; Ray's processes get it on their command line, so the flag is
    restored once ``ray.init`` returns.

    Joining such a Ray by ``127.0.0.1:PORT`` needs the same flag: otherwise ``ray.init`` replaces
    the loopback address with the host IP, where nothing listens, and retries forever.
    """
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):   # a Ray without the switch: say so
        log.warning("this Ray has no ray_constants.ENABLE_RAY_CLUSTER: the local Ray listens on the host IP")
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


@contextlib.contextmanager
def ray_session(out: str | os.PathLike | None, address: Optional[str] = None, num_cpus: Optional[int] = None,
                num_gpus: Optional[int] = None, include_dashboard: Optional[bool] = None,
                log_to_driver: bool = True) -> Iterator[dict]:
    """Start (or join, or reuse) Ray for the duration of the block.

    An embedded Ray keeps its temp dir under ``out`` (:func:`ray_temp_dir`); with ``out=None``
    (a job whose output is not a local directory, e.g. shards written to a URL) it gets a fresh
    short one in /tmp, removed on exit. Yields ``{"mode": "reused" | "joined" | "local",
    "address": ..., "temp_dir": ...}``; Ray is shut down on exit only when this block started or
    joined it.
    """
    import ray

    env = quiet_environment()
    if ray.is_initialized():
        yield {"mode": "reused", "address": None, "temp_dir": None}
        return
    addr = cluster_address(address)
    api_env_set = False
    if addr:
        # a job's own runtime_env (``ray job submit``) may set the same variables: pass none here
        log.info("joining Ray cluster at %s", addr)
        # an embedded Ray of another dvsa process listens on loopback only, where Ray would not look
        with loopback_ray() if is_loopback_address(addr) else contextlib.nullcontext():
            ray.init(address=addr, log_to_driver=log_to_driver, configure_logging=False)
        info = {"mode": "joined", "address": addr, "temp_dir": None}
    else:
        tmp = ray_temp_dir(out) if out is not None else tempfile.mkdtemp(prefix="dvsa-ray-", dir="/tmp")
        log.info("starting a local Ray (temp dir %s)", tmp)
        dashboard_port = None
        if include_dashboard is not False and API_SERVER_ENV not in os.environ:
            # Ray processes that query the State API without an address (Ray Train V2's
            # PlacementGroupCleaner, which frees the workers' placement group of a trial Tune
            # stopped) fail with "Found multiple active Ray instances" when other Ray clusters run
            # on the machine: pin this cluster's API server in the environment Ray's processes inherit.
            dashboard_port = free_port()
            os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{dashboard_port}"
            api_env_set = True
        with loopback_ray():
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, _temp_dir=tmp, include_dashboard=include_dashboard,
                     dashboard_host="127.0.0.1", dashboard_port=dashboard_port, runtime_env={"env_vars": env},
                     _system_config=LOCAL_SYSTEM_CONFIG, log_to_driver=log_to_driver, configure_logging=False)
        info = {"mode": "local", "address": None, "temp_dir": tmp}
    raise_on_sigterm()    # ray.init's own handler exits without unwinding the job (its run stays RUNNING)
    try:
        yield info
    finally:
        ray.shutdown()
        if api_env_set:
            os.environ.pop(API_SERVER_ENV, None)
        if out is None and info["temp_dir"]:
            shutil.rmtree(info["temp_dir"], ignore_errors=True)
