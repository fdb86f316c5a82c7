"""``dvsa compare --experiment NAME [--out DIR]``: the paper's Table 5 (full-frame vs region
captioners) and Table 1 (retrieval), read back from MLflow (:mod:`dvsa.experiments.compare`).

Printed as Markdown; written as ``compare.csv`` (+ ``compare_retrieval.csv``) and
``compare.md`` under ``--out`` (default ``<runs>/compare/<experiment>``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dvsa import tracking
from dvsa.errors import DvsaError
from dvsa.experiments.compare import compare

HELP = "read an MLflow experiment back and print the full-frame vs region table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--out", default=None, help="where to write compare.csv/.md "
                                                    "(default: <runs>/compare/<experiment>)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///<runs>/mlflow.db)")
    parser.add_argument("--runs", default="runs", help="the jobs' output dir (`out` in the config; default: runs)")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = args.tracking_uri or tracking.tracking_uri(Path(args.runs).resolve())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise DvsaError(f"no MLflow store at {uri[len('sqlite:///'):]} (pass --tracking-uri or --runs)")
    out = args.out or Path(args.runs) / "compare" / args.experiment
    result = compare(args.experiment, uri, out)
    print(result["markdown"], end="")
    print("written: " + ", ".join(str(p) for p in result["paths"]))
    return 0
