"""A sweep's outputs: the summary table (trial, outcome, epochs, params, metric) and the best
trial's config as a YAML that ``dvsa train-caption --config`` (or ``train-align``) takes as is."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dvsa.config import Config
from dvsa.tuning.space import apply_params


@dataclass
class TrialRow:
    trial_id: str
    outcome: str                    # finished | early_stopped | error | not_run
    epochs: int                     # epochs the trial completed
    params: dict                    # the trial's sampled values
    metric: Optional[float]         # the ranked metric (last or best epoch, tune.best_scope)
    run_id: Optional[str] = None    # its MLflow child run
    error: Optional[str] = None
    best: bool = False


@dataclass
class SweepOutcome:
    name: str
    experiment_dir: str             # Tune's experiment dir (re-run with the same name resumes it)
    tracking_uri: str
    parent_run_id: str
    metric: str
    mode: str
    trials: list[TrialRow] = field(default_factory=list)
    best: Optional[TrialRow] = None
    best_config: Optional[str] = None     # path of the best config YAML
    summary: Optional[str] = None         # path of the summary table (text)
    resumed: bool = False


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "-" if v is None else str(v)


def format_table(rows: list[TrialRow], metric: str) -> str:
    """A plain-text table, one line per trial, best trial marked with ``*``, sorted by trial id."""
    keys = sorted({k for r in rows for k in r.params})
    header = ["", "trial", "outcome", "epochs", *keys, metric]
    lines = [[("*" if r.best else ""), r.trial_id, r.outcome, str(r.epochs),
              *[_fmt(r.params.get(k)) for k in keys], _fmt(r.metric)] for r in sorted(rows, key=lambda r: r.trial_id)]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths).rstrip())
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out) + "\n"


def table_rows(rows: list[TrialRow], metric: str) -> list[dict]:
    """The table as same-keyed dicts (an MLflow table artifact)."""
    keys = sorted({k for r in rows for k in r.params})
    return [{"trial": r.trial_id, "outcome": r.outcome, "epochs": r.epochs,
             **{k: r.params.get(k) for k in keys}, metric: r.metric, "best": r.best, "run_id": r.run_id}
            for r in sorted(rows, key=lambda r: r.trial_id)]


def best_config(base: Config, params: dict) -> Config:
    """The config to train the best trial's settings: base + its values, as a fresh training
    job (no Train run name to resume, no search space left)."""
    cfg = apply_params(base, params)
    return cfg.replace(**{"train.name": None, "mlflow.run_name": None, "tune.name": None, "tune.space": {}})


def write_best_config(cfg: Config, path: str | os.PathLike, sweep: str, trial: TrialRow, metric: str) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cmd = "train-align" if cfg.task == "align" else "train-caption"
    head = [f"# best trial {trial.trial_id} of sweep {sweep}: {metric} = {_fmt(trial.metric)}",
            *[f"#   {k} = {v!r}" for k, v in sorted(trial.params.items())],
            f"# train it: dvsa {cmd} --config {p.name}", ""]
    p.write_text("\n".join(head) + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return p
