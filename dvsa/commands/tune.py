"""``dvsa tune --config configs/tune_tiny.yaml key=value ...``: a Ray Tune sweep recorded in
MLflow (see :mod:`dvsa.tuning.sweep`). Re-run with the same ``tune.name`` to resume one."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from dvsa.config import load_config
from dvsa.tuning import run_sweep

HELP = "run a Ray Tune sweep over a config's search space, recorded in MLflow"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML preset with a tune: section (configs/tune_tiny.yaml)")
    parser.add_argument("--name", default=None, help="sweep name (= tune.name); the same name resumes a sweep")
    parser.add_argument("--outcome-json", default=None,
                        help="also write the outcome (trials, best trial, best config path) to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. tune.num_samples=8 tune.search=optuna train.epochs=3")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.name:
        overrides.append(f"tune.name={args.name}")
    cfg = load_config(args.config, overrides)
    outcome = run_sweep(cfg)
    if args.outcome_json:
        with open(args.outcome_json, "w") as f:
            json.dump(asdict(outcome), f, indent=2, default=str)
    return 0
