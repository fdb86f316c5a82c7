"""Shared arguments and body of ``dvsa train-align`` / ``dvsa train-caption`` (and jobs/)."""

from __future__ import annotations

import argparse
import json

from dvsa.config import load_config
from dvsa.train.launch import outcome_dict, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML preset (configs/tiny.yaml, configs/vg.yaml)")
    parser.add_argument("--outcome-json", default=None,
                        help="also write the outcome (run id, checkpoint, metrics) to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.epochs=2 caption.mode=fullframe")


def run(args: argparse.Namespace, task: str) -> int:
    # the command fixes the task; an explicit task=... override still wins (and is then refused)
    cfg = load_config(args.config, [f"task={task}", *args.overrides])
    outcome = train(cfg, task)
    if args.outcome_json:
        with open(args.outcome_json, "w") as f:
            json.dump(outcome_dict(outcome), f, indent=2, default=str)
    return 0
