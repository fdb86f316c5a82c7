"""The sweep's MLflow record, written by the Tune driver alone (one writer: no SQLite lock race,
no lost metric however many trials run at once).

One parent run per sweep (tags ``dvsa.role=sweep``, ``dvsa.sweep=<name>``) and one child run per
trial (``mlflow.parentRunId`` = the parent, ``dvsa.role=trial``, ``dvsa.trial_id``): params =
the trial's resolved config, metrics = every ``train/*``, ``val/*`` and ``epoch`` value the trial
reports, at the trial's optimizer step. A trial that ends is closed: ``FINISHED`` when it ran
all its epochs, ``KILLED`` when the scheduler (ASHA) or the time budget stopped it early
(tag ``dvsa.trial_outcome=early_stopped``), ``FAILED`` on an error. A resumed sweep reopens its
parent and the child runs of its unfinished trials and skips epochs they already logged.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from ray.tune import Callback

from dvsa import tracking
from dvsa.config import from_dict
from dvsa.tuning.trial import trial_config

log = logging.getLogger(__name__)

ROLE_TAG = "dvsa.role"
SWEEP_TAG = "dvsa.sweep"
TRIAL_TAG = "dvsa.trial_id"
OUTCOME_TAG = "dvsa.trial_outcome"
PARENT_TAG = "mlflow.parentRunId"
BEST_TAG = "dvsa.best"

FINISHED, EARLY_STOPPED, ERROR = "finished", "early_stopped", "error"


def reported_metrics(result: dict) -> dict[str, float]:
    """The trial's own numbers in a Tune result (Tune's bookkeeping fields left out)."""
    return {k: v for k, v in result.items()
            if (k == "epoch" or k.startswith(("train/", "val/")))
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def trial_outcome(last: Optional[dict], epochs: int, max_steps: int, errored: bool = False) -> str:
    """finished | early_stopped | error, from the trial's last result and its own epoch budget."""
    if errored:
        return ERROR
    last = last or {}
    epoch, step = int(last.get("epoch", 0) or 0), int(last.get("step", 0) or 0)
    if epoch >= epochs or (max_steps and step >= max_steps):
        return FINISHED
    return EARLY_STOPPED


def find_child(uri: str, experiment_id: str, parent_run_id: str, trial_id: str):
    c = tracking.client(uri)
    q = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
    found = tracking.retry_locked(c.search_runs, [experiment_id], filter_string=q, max_results=1)
    return found[0] if found else None


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """``{trial_id: mlflow Run}`` of a sweep's children."""
    c = tracking.client(uri)
    q = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    runs = tracking.retry_locked(c.search_runs, [experiment_id], filter_string=q, max_results=10000)
    return {r.data.tags.get(TRIAL_TAG): r for r in runs}


class MlflowTrials(Callback):
    """Tune callback (runs in the driver) that keeps the child runs; see the module doc."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, sweep: str, base: dict,
                 storage_path: str, tags: Optional[dict] = None):
        self.uri = uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.base = base                  # the sweep's base config, as a dict
        self.storage_path = storage_path
        self.tags = dict(tags or {})
        self._open: dict[str, dict] = {}  # trial_id -> {"logger", "last_epoch", "epochs", "max_steps"}

    def __getstate__(self):               # pickled into Tune's experiment state: no live handles
        d = dict(self.__dict__)
        d["_open"] = {}
        return d

    # ------------------------------------------------------------------ runs
    def _trial_cfg(self, trial):
        return trial_config(from_dict(self.base), trial.config, self.sweep, trial.trial_id, self.storage_path)

    def _entry(self, trial) -> dict:
        entry = self._open.get(trial.trial_id)
        if entry is not None:
            return entry
        cfg = self._trial_cfg(trial)
        found = find_child(self.uri, self.experiment_id, self.parent_run_id, trial.trial_id)
        last_epoch = 0
        if found is not None:
            run_id = found.info.run_id
            c = tracking.client(self.uri)
            tracking.retry_locked(c.update_run, run_id, status="RUNNING")
            hist = tracking.retry_locked(c.get_metric_history, run_id, "epoch")
            last_epoch = int(max((m.value for m in hist), default=0))
        else:
            tags = {**self.tags, PARENT_TAG: self.parent_run_id, ROLE_TAG: "trial", SWEEP_TAG: self.sweep,
                    TRIAL_TAG: trial.trial_id, tracking.TRAIN_NAME_TAG: cfg.train.name}
            c = tracking.client(self.uri)
            run = tracking.retry_locked(c.create_run, self.experiment_id, tags=tags,
                                        run_name=f"{self.sweep}-{trial.trial_id}")
            run_id = run.info.run_id
        logger = tracking.RunLogger(self.uri, run_id)
        logger.log_params(cfg.flat())
        entry = {"logger": logger, "last_epoch": last_epoch, "epochs": cfg.train.epochs,
                 "max_steps": cfg.train.max_steps}
        self._open[trial.trial_id] = entry
        return entry

    def _close(self, trial, outcome: str, error: Optional[str] = None) -> None:
        entry = self._open.pop(trial.trial_id, None) or self._entry_then_pop(trial)
        logger = entry["logger"]
        tags = {OUTCOME_TAG: outcome}
        if outcome == EARLY_STOPPED:
            tags["dvsa.stopped_at_epoch"] = int((trial.last_result or {}).get("epoch", 0) or 0)
        if error:
            tags["dvsa.error"] = error[:5000]
        logger.set_tags(tags)
        logger.end({FINISHED: "FINISHED", EARLY_STOPPED: "KILLED", ERROR: "FAILED"}[outcome])

    def _entry_then_pop(self, trial) -> dict:
        entry = self._entry(trial)
        self._open.pop(trial.trial_id, None)
        return entry

    # ------------------------------------------------------------------ Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self._entry(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        entry = self._entry(trial)
        metrics = reported_metrics(result)
        epoch = int(metrics.get("epoch", 0))
        if not metrics or (epoch and epoch <= entry["last_epoch"]):
            return                        # an epoch logged before the sweep was interrupted
        step = int(result.get("step", epoch) or epoch)
        entry["logger"].log_metrics(metrics, step=step, flush=True)
        entry["last_epoch"] = max(entry["last_epoch"], epoch)

    def on_trial_complete(self, iteration, trials, trial, **info):
        entry = self._open.get(trial.trial_id)
        epochs = entry["epochs"] if entry else self._trial_cfg(trial).train.epochs
        max_steps = entry["max_steps"] if entry else self._trial_cfg(trial).train.max_steps
        self._close(trial, trial_outcome(trial.last_result, epochs, max_steps))

    def on_trial_error(self, iteration, trials, trial, **info):
        msg = None
        try:
            msg = str(trial.get_pickled_error() or trial.get_error() or "") or None
        except Exception:  # the error file may be unreadable; the status says enough
            msg = None
        self._close(trial, ERROR, msg.strip().splitlines()[-1] if msg and msg.strip() else None)

    def on_experiment_end(self, trials, **info):
        """Trials still open (the time budget ran out, or the driver is stopping): end them."""
        for trial in trials:
            if trial.trial_id in self._open:
                try:
                    self._close(trial, EARLY_STOPPED)
                except Exception as e:  # never fail the sweep's ending over bookkeeping
                    log.warning("could not close the MLflow run of trial %s: %s", trial.trial_id, e)
