#!/usr/bin/env bash
# GPU check for a lent GPU machine (the `device` tool), or any CUDA box. Self-contained:
#   bash benchmarks/gpu_check.sh [key=value config overrides...]
#   GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh      # the same stages on a CPU (checks the script)
# Results: a table on stdout and JSON in $OUT/gpu_check.json when $OUT is set, else
# benchmarks/results/gpu_check[_cpu].json. Stages: synth + prepare (real shards), region
# captioner training steps in bf16 autocast and fp32 (step time, images/s, peak GPU memory),
# an NCCL all_reduce (torch.distributed; via a 1-worker TorchTrainer when Ray is present),
# and the real `python -m jobs.train_caption train.use_gpu=true` job when Ray, MLflow,
# webdataset, pycocoevalcap and Java are all present (else skipped, with the reason).
#
# On the device machine (bare; offline; its python3 already has torch/torchvision/numpy/
# pillow/pyyaml/fsspec/tqdm): the project is installed from this working tree WITHOUT
# dependencies, so its torch stays. It lacks ijson (read by `dvsa prepare vg`): run
# `bash benchmarks/gpu_wheels.sh` here first, which puts ijson/webdataset wheels in .whl/,
# and carry .whl; they are installed into /tmp/site before anything else.
# Device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540).
#   The step switches (benchmarks/gpu_step.py, < 8 min):
#   run(command="GPU_CHECK_SCRIPT=benchmarks/gpu_step.py bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 TQDM_DISABLE=1 \
       PYTHONUNBUFFERED=1 LC_ALL=C.UTF-8

if [ -x .venv/bin/python ] && .venv/bin/python -c "import dvsa" 2>/dev/null; then
  PY=.venv/bin/python                       # a checkout set up with scripts/setup.sh
else
  PY=${PYTHON:-python3}
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
          --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # the project itself, without touching the machine's torch
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . 2>/dev/null \
    || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import torch, torchvision, yaml, numpy, PIL, fsspec; import dvsa" || {
  echo "gpu_check: the project cannot be imported with $PY" >&2; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

# GPU_CHECK_SCRIPT=benchmarks/gpu_step.py: the train-step switches instead (same installation)
exec "$PY" "${GPU_CHECK_SCRIPT:-benchmarks/gpu_check.py}" "$@"
