#!/usr/bin/env bash
# Create .venv/ in the checkout and install dvsa with its test extras.
# torch/torchvision are installed first, pinned to a CUDA-capable build that also runs on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
.venv/bin/python -m pip install -q -e '.[test,lint,cluster]'
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "note: PostgreSQL not found. The tracking-server tests need it: sudo apt-get install postgresql" >&2
fi
if ! command -v java >/dev/null 2>&1; then
  echo "note: Java not found. METEOR (pycocoevalcap) needs it: sudo apt-get install default-jre-headless" >&2
fi
