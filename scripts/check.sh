#!/usr/bin/env bash
# Lint (ruff), types (mypy on the files pyproject.toml lists), then the tests.
# Arguments go to pytest: none = the whole suite; `-m "not slow"` = the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
echo "ruff: $(.venv/bin/ruff --version)"
.venv/bin/ruff check .
echo "mypy: $(.venv/bin/mypy --version)"
.venv/bin/mypy
if [ "$#" -eq 0 ]; then
  set -- tests
fi
exec .venv/bin/python -m pytest -q --durations=25 "$@"
