"""MLflow: the tracking store, one run per job, and batched logging from the driver and rank 0.

The default store is a SQLite file ``<out>/mlflow.db`` (MLflow 3 refuses the old ``./mlruns``
file store); ``MLFLOW_TRACKING_URI`` overrides it, then ``mlflow.tracking_uri`` in the config.
Several processes migrating a fresh SQLite schema at once race, so the *driver* creates and
migrates the store and the experiment before any Ray worker opens it (:func:`prepare_store`);
workers only append to an existing run. Every call goes through :func:`retry_locked`, which
retries SQLite's transient "database is locked".

On a cluster the store is a tracking server (``mlflow server`` over PostgreSQL, reached with
``MLFLOW_TRACKING_URI=http://...``). A server that stops answering for a while (restarted,
network blip) does not stop training: :class:`RunLogger` keeps the metrics it could not send
and sends them with the next ones; only beyond ``MAX_PENDING_METRICS``, or when the final
flush has waited ``FINAL_FLUSH_WAIT_S``, are metrics given up, and their number is logged as
``mlflow/dropped_metrics`` when the run ends.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PARAM_CHARS = 6000      # MLflow's limit on a param value
BATCH_PARAMS = 100          # log_batch limits
BATCH_METRICS = 1000
MAX_PENDING_METRICS = 200_000   # metrics a logger queues while its store does not answer
FINAL_FLUSH_WAIT_S = 120.0      # how long the last flush (end of an epoch loop, of a run) retries
DROPPED_METRIC = "mlflow/dropped_metrics"
TRAIN_NAME_TAG = "dvsa.train_name"
CHECKPOINT_TAG = "dvsa.checkpoint"
RUN_DIR_TAG = "dvsa.run_dir"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def tracking_uri(out: str | os.PathLike, configured: Optional[str] = None) -> str:
    """``MLFLOW_TRACKING_URI``, else the config's ``mlflow.tracking_uri``, else ``sqlite:///<out>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


def retry_locked(fn: Callable[..., T], *args: Any, attempts: int = 10, delay: float = 0.1, **kwargs: Any) -> T:
    """Call ``fn``; on SQLite's "database is locked" wait (exponential back-off) and retry."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MlflowException / sqlalchemy OperationalError both carry the text
            if "database is locked" not in str(e) or i == attempts - 1:
                raise
            time.sleep(delay * (2 ** i))
    raise AssertionError("unreachable")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def artifact_root(uri: str) -> Optional[str]:
    """Where a SQLite store's artifacts go: ``<db dir>/mlartifacts`` (MLflow's own default would be
    ``./mlruns`` in whatever directory the job happened to start in). None for servers, which
    pick their own artifact store."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts")
    return None


def prepare_store(uri: str, experiment: str) -> str:
    """Create (and migrate) the store and the experiment; return the experiment id."""
    root = artifact_root(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    c = client(uri)
    exp = retry_locked(c.get_experiment_by_name, experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        location = Path(root, experiment).as_uri() if root else None
        return retry_locked(c.create_experiment, experiment, artifact_location=location)
    except Exception:  # created meanwhile by another driver
        exp = retry_locked(c.get_experiment_by_name, experiment)
        if exp is None:
            raise
        return exp.experiment_id


def param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else ("None" if v is None else str(v))
    return s if len(s) <= MAX_PARAM_CHARS else s[: MAX_PARAM_CHARS - 3] + "..."


WORKER_STARTS_TAG = "dvsa.worker_starts"   # how many times the training workers started in a run


class RunLogger:
    """Appends to one existing MLflow run: params, metrics (buffered, batched), artifacts.

    Used by the driver and by rank 0 inside the train loop (it only needs ``uri`` + ``run_id``,
    both plain strings, so it is cheap to build on a worker).
    """

    def __init__(self, uri: str, run_id: str, flush_every: int = 200, max_pending: int = MAX_PENDING_METRICS,
                 final_wait_s: float = FINAL_FLUSH_WAIT_S):
        self.uri = uri
        self.run_id = run_id
        self.flush_every = flush_every
        self.max_pending = max_pending
        self.final_wait_s = final_wait_s
        self._client = client(uri)
        self._pending: list = []
        self.dropped = 0              # metrics given up on (the store unreachable for too long)
        self._outage_since: Optional[float] = None

    # ------------------------------------------------------------------ params / tags
    def log_params(self, params: Mapping[str, Any]) -> dict[str, str]:
        """Log params; keys already on the run with another value (a resumed job whose config
        changed) are kept and the new value recorded as tag ``changed.<key>``. Returns those."""
        from mlflow.entities import Param, RunTag

        existing = retry_locked(self._client.get_run, self.run_id).data.params
        new, changed = [], {}
        for k, v in params.items():
            sv = param_value(v)
            if k not in existing:
                new.append(Param(k, sv))
            elif existing[k] != sv:
                changed[k] = sv
        for i in range(0, len(new), BATCH_PARAMS):
            retry_locked(self._client.log_batch, self.run_id, params=new[i:i + BATCH_PARAMS])
        if changed:
            tags = [RunTag(f"changed.{k}", v) for k, v in changed.items()]
            retry_locked(self._client.log_batch, self.run_id, tags=tags)
        return changed

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        retry_locked(self._client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def record_worker_start(self, step: int, resumed: bool) -> int:
        """Count one more start of the training workers in this run (tag
        :data:`WORKER_STARTS_TAG`, metric ``train/worker_start`` at the step it starts from):
        a count above one is a worker group restarted after a failure, or a resumed job.
        Returns the count."""
        tags = retry_locked(self._client.get_run, self.run_id).data.tags
        try:
            starts = int(tags.get(WORKER_STARTS_TAG, 0)) + 1
        except ValueError:
            starts = 1
        self.set_tags({WORKER_STARTS_TAG: starts})
        self.log_metrics({"train/worker_start": float(starts), "train/resumed": float(resumed)}, step)
        return starts

    # ------------------------------------------------------------------ metrics
    def log_metrics(self, metrics: Mapping[str, float], step: int, flush: bool = True) -> None:
        """Queue finite numeric metrics at ``step``; NaN/inf and non-numbers are skipped. The
        queue is sent when ``flush`` (or when it is long); a store that does not answer keeps
        it queued for the next send instead of stopping the caller (:meth:`try_flush`)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                continue
            self._pending.append(Metric(k, float(v), ts, int(step)))
        if flush or len(self._pending) >= self.flush_every:
            self.try_flush()

    def _send(self) -> None:
        while self._pending:
            retry_locked(self._client.log_batch, self.run_id, metrics=self._pending[:BATCH_METRICS])
            del self._pending[:BATCH_METRICS]

    def try_flush(self) -> bool:
        """Send the queued metrics; when the store does not answer (a tracking server restarting,
        a network blip) keep them for the next call, dropping the oldest beyond
        ``max_pending`` (counted in :attr:`dropped`). Returns whether everything was sent."""
        try:
            self._send()
        except Exception as e:  # connection refused, timeouts, 5xx after MLflow's own retries
            if self._outage_since is None:
                self._outage_since = time.time()
                log.warning("MLflow at %s did not take %d metrics (%s); keeping them and retrying at the "
                            "next log", self.uri, len(self._pending), str(e).splitlines()[0][:200])
            excess = len(self._pending) - self.max_pending
            if excess > 0:
                del self._pending[:excess]
                self.dropped += excess
            return False
        if self._outage_since is not None:
            log.warning("MLflow at %s answers again after %.0f s; the queued metrics were sent", self.uri,
                        time.time() - self._outage_since)
            self._outage_since = None
        return True

    def flush(self) -> None:
        """Send every queued metric, retrying for up to ``final_wait_s`` while the store does not
        answer; then give them up (counted in :attr:`dropped`, warned) rather than hang."""
        deadline = time.time() + self.final_wait_s
        delay = 0.5
        while not self.try_flush():
            if time.time() >= deadline:
                log.error("MLflow at %s: %d metrics could not be logged and are dropped", self.uri,
                          len(self._pending))
                self.dropped += len(self._pending)
                self._pending.clear()
                return
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    # ------------------------------------------------------------------ artifacts
    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        retry_locked(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        retry_locked(self._client.log_dict, self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        retry_locked(self._client.log_text, self.run_id, text, artifact_file)

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        """A list of same-keyed dicts as an MLflow table (viewable in the UI's artifact tab)."""
        if not rows:
            return
        columns = {k: [r.get(k) for r in rows] for k in rows[0]}
        retry_locked(self._client.log_table, self.run_id, data=columns, artifact_file=artifact_file)

    def log_figure(self, fig, artifact_file: str) -> None:
        retry_locked(self._client.log_figure, self.run_id, fig, artifact_file)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        hist = retry_locked(self._client.get_metric_history, self.run_id, key)
        return sorted((m.step, m.value) for m in hist)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        if self.dropped:
            self.log_metrics({DROPPED_METRIC: float(self.dropped)}, 0, flush=False)
            self.flush()
        retry_locked(self._client.set_terminated, self.run_id, status)


@contextmanager
def ending(run: RunLogger) -> Iterator[RunLogger]:
    """End ``run`` when the block ends: FINISHED when it returns, KILLED on Ctrl-C or SIGTERM
    (:class:`dvsa.errors.Terminated` is a KeyboardInterrupt), FAILED on an error; failing to
    end the run is a warning and never masks the block's own error."""
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            run.end(status)
        except Exception as e:
            log.warning("could not end MLflow run %s: %s", run.run_id, e)


def start_run(uri: str, experiment: str, run_name: Optional[str], tags: Mapping[str, Any],
              resume_name: Optional[str] = None) -> tuple[RunLogger, bool]:
    """Create the job's run, or reopen the run of an earlier job with the same train name.

    Returns ``(logger, resumed)``. Resumed runs are set back to RUNNING.
    """
    exp_id = prepare_store(uri, experiment)
    c = client(uri)
    if resume_name:
        q = f"tags.`{TRAIN_NAME_TAG}` = '{resume_name}'"
        found = retry_locked(c.search_runs, [exp_id], filter_string=q, max_results=1,
                             order_by=["attributes.start_time DESC"])
        if found:
            run_id = found[0].info.run_id
            retry_locked(c.update_run, run_id, status="RUNNING")
            return RunLogger(uri, run_id), True
    all_tags = {k: str(v) for k, v in tags.items()}
    if resume_name:
        all_tags[TRAIN_NAME_TAG] = resume_name
    run = retry_locked(c.create_run, exp_id, tags=all_tags, run_name=run_name)
    return RunLogger(uri, run.info.run_id), False


def find_run(uri: str, run_id: str):
    """The MLflow run with this id, or None."""
    try:
        return retry_locked(client(uri).get_run, run_id)
    except Exception as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in str(e).lower():
            return None
        raise


def is_run_id(text: str) -> bool:
    """Whether ``text`` has the shape of an MLflow run id (32 lowercase hex digits)."""
    return bool(_RUN_ID.match(str(text)))


def find_checkpoint_run(uri: str, checkpoint: str, checkpoint_dir: str | os.PathLike) -> Optional[str]:
    """The run that trained a checkpoint: ``checkpoint`` itself when it is the id of a run in
    this store; else the newest run whose ``dvsa.checkpoint`` tag is ``checkpoint_dir`` or whose
    ``dvsa.run_dir`` holds it; for an MLflow model URI (``runs:/``, ``models:/``) the run that
    logged the model; None when no run matches."""
    if is_model_uri(checkpoint):
        return model_source(uri, str(checkpoint)).run_id
    if is_run_id(checkpoint) and find_run(uri, checkpoint) is not None:
        return str(checkpoint)
    c = client(uri)
    exps = [e.experiment_id for e in retry_locked(c.search_experiments)]
    if not exps:
        return None
    d = str(Path(checkpoint_dir).resolve())
    for tag, value in ((CHECKPOINT_TAG, d), (RUN_DIR_TAG, str(Path(d).parent))):
        if "'" in value:
            continue
        runs = retry_locked(c.search_runs, exps, filter_string=f"tags.`{tag}` = '{value}'",
                            max_results=1, order_by=["attributes.start_time DESC"])
        if runs:
            return runs[0].info.run_id
    return None


# --------------------------------------------------------------------------- MLflow models
# A training job logs its result as an MLflow model named MODEL_NAME in its run (an MLflow 3
# "logged model" whose source run is the job's run) and registers it; ``runs:/<run id>/model``
# and ``models:/<name>/<version|latest>`` / ``models:/<name>@<alias>`` then name it anywhere
# the tracking server is reachable (dvsa.inference.mlflow_model; resolved by model_source).

MODEL_NAME = "model"                       # runs:/<run id>/model
MODEL_URI_TAG = "dvsa.model_uri"           # the run's runs:/ URI of its model
REGISTERED_MODEL_TAG = "dvsa.registered_model"   # models:/<name>/<version> it was registered as
MODEL_ID_TAG = "dvsa.model_id"             # on a model version: the logged model it registers
MODEL_URI_FORMS = "runs:/<run id>/model, models:/<name>/<version|latest>, models:/<name>@<alias>"
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_model_uri(text: str) -> bool:
    """Whether ``text`` is an MLflow model URI (``runs:/...`` or ``models:/...``)."""
    return str(text).startswith(("runs:/", "models:/"))


@dataclass(frozen=True)
class ModelSource:
    """Where the files of an MLflow model are: ``location`` (the artifact URI of the model
    directory, the one holding ``MLmodel``), the ``run_id`` that logged it (None when unknown),
    its logged-model id and, for ``models:/`` URIs, the registered version."""

    uri: str
    location: str
    run_id: Optional[str]
    model_id: Optional[str] = None
    version: Optional[str] = None


def _not_found(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_DOES_NOT_EXIST" in text or "not found" in text.lower() or "does not exist" in text.lower() \
        or getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def model_source(uri: str, model_uri: str) -> ModelSource:
    """Resolve ``runs:/<run id>/<name>``, ``models:/<name>/<version>``, ``models:/<name>/latest``,
    ``models:/<name>@<alias>`` or ``models:/<model id>`` in the store at ``uri``. A URI that does
    not resolve is one DvsaError line naming it and the store."""
    from dvsa.errors import DvsaError

    def fail(what: str) -> DvsaError:
        return DvsaError(f"--checkpoint {model_uri}: {what} in {uri}")

    def malformed(what: str) -> DvsaError:
        return DvsaError(f"--checkpoint {model_uri}: {what} ({MODEL_URI_FORMS})")

    try:
        if model_uri.startswith("runs:/"):
            return _run_model(uri, model_uri, fail, malformed)
        if model_uri.startswith("models:/"):
            return _registered_model(uri, model_uri, fail, malformed)
    except DvsaError:
        raise
    except Exception as e:   # the store unreachable, refused, ...: one line, not MLflow's traceback
        raise fail(f"cannot resolve the model ({type(e).__name__}: {first_line(e)})") from None
    raise malformed("not an MLflow model URI")


def _run_model(uri: str, model_uri: str, fail, malformed) -> ModelSource:
    run_id, _, path = model_uri[len("runs:/"):].partition("/")
    path = path.strip("/")
    if not run_id or not path:
        raise malformed("a runs:/ URI names a run and its model")
    run = find_run(uri, run_id) if _PLAIN_NAME.match(run_id) else None
    if run is None:
        raise fail(f"no MLflow run {run_id}")
    name, _, rest = path.partition("/")
    c = client(uri)
    found = []
    if _PLAIN_NAME.match(name):
        found = retry_locked(c.search_logged_models, [run.info.experiment_id],
                             filter_string=f"name = '{name}' AND source_run_id = '{run_id}'",
                             order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1)
    if found:
        location = found[0].artifact_location.rstrip("/") + (f"/{rest}" if rest else "")
        return ModelSource(model_uri, location, run_id, found[0].model_id)
    # a model logged among the run's own artifacts (MLflow 2 style)
    listed = {posixpath.basename(f.path) for f in retry_locked(c.list_artifacts, run_id, path)}
    if "MLmodel" in listed:
        return ModelSource(model_uri, f"runs:/{run_id}/{path}", run_id)
    raise fail(f"MLflow run {run_id} has no model {path!r} (a dvsa training run logs {MODEL_NAME!r})")


def _found(fail, missing: str, call, *args):
    """``call(*args)`` (retried while the store is locked); a not-found answer becomes ``fail(missing)``."""
    try:
        return retry_locked(call, *args)
    except Exception as e:
        if _not_found(e):
            raise fail(missing) from None
        raise


def _registered_model(uri: str, model_uri: str, fail, malformed) -> ModelSource:
    body = model_uri[len("models:/"):]
    c = client(uri)
    if "/" not in body and "@" not in body:            # models:/<model id>
        lm = _found(fail, f"no logged model {body!r}", c.get_logged_model, body)
        return ModelSource(model_uri, lm.artifact_location, lm.source_run_id, lm.model_id)
    if "/" in body:
        name, _, suffix = body.partition("/")
        alias = None
        if not suffix or "/" in suffix or not (suffix.isdigit() or suffix.lower() == "latest"):
            raise malformed(f"{suffix!r} is not a version number or 'latest'")
    else:
        name, _, alias = body.rpartition("@")
        suffix = ""
        if not alias:
            raise malformed("no alias after '@'")
    registered = _found(fail, f"no such registered model {name!r}", c.get_registered_model, name)
    if alias is None and not suffix.isdigit():        # latest: the highest version number
        versions = list(registered.latest_versions or [])
        if not versions and "'" not in name:
            versions = list(retry_locked(c.search_model_versions, f"name = '{name}'"))
        if not versions:
            raise fail(f"registered model {name!r} has no versions")
        mv = max(versions, key=lambda v: int(v.version))
    else:
        if alias is not None:
            mv = _found(fail, f"registered model {name!r} has no alias {alias!r}", c.get_model_version_by_alias,
                        name, alias)
        else:
            mv = _found(fail, f"registered model {name!r} has no version {suffix}", c.get_model_version, name, suffix)
    model_id = getattr(mv, "model_id", None) or (mv.tags or {}).get(MODEL_ID_TAG)
    run_id = mv.run_id or None
    if model_id:
        lm = retry_locked(c.get_logged_model, model_id)
        return ModelSource(model_uri, lm.artifact_location, run_id or lm.source_run_id, model_id, str(mv.version))
    return ModelSource(model_uri, mv.source, run_id, None, str(mv.version))


def download_model_files(uri: str, source: ModelSource, subpath: str, dst: str | os.PathLike) -> Path:
    """Download ``subpath`` of the model's directory into the directory ``dst``; returns the
    local path of what was downloaded."""
    import mlflow.artifacts

    with quiet_mlflow():
        return Path(retry_locked(mlflow.artifacts.download_artifacts, artifact_uri=f"{source.location}/{subpath}",
                                 dst_path=str(dst), tracking_uri=uri))


@contextmanager
def quiet_mlflow() -> Iterator[None]:
    """MLflow's model saving and artifact downloads without their progress bars, advice
    warnings and log lines (a job prints its own one-line summary); errors still raise."""
    import warnings

    names = ("mlflow.pyfunc", "mlflow.models", "mlflow.models.model", "mlflow.store.artifact.artifact_repo")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    had_bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = had_bar if had_bar is not None else "false"
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if had_bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
