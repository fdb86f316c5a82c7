#!/usr/bin/env bash
# The cluster rehearsal alone (tests/test_cluster_rehearsal.py: the README's "On a cluster" jobs on
# a head + worker node of this machine, MLflow server over PostgreSQL, three faults), writing the
# wall time of each job and what each fault cost to benchmarks/results/cluster_rehearsal.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
mkdir -p benchmarks/results
DVSA_REHEARSAL_REPORT=benchmarks/results/cluster_rehearsal.json \
  exec .venv/bin/python -m pytest -q -s tests/test_cluster_rehearsal.py "$@"
