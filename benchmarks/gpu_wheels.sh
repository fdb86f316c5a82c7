#!/usr/bin/env bash
# Run HERE (a machine with pip access), before a device run of benchmarks/gpu_check.sh:
# downloads into .whl/ (git-ignored) the few pure/small wheels that the device machine's
# python3 (3.12, torch preinstalled, offline) lacks for the synth -> prepare -> train stages.
# Then call the device tool with carry [".whl"]; gpu_check.sh installs them into /tmp/site.
# Ray (79 MB), MLflow and pycocoevalcap (+ Java) do not fit the 64 MiB carry limit: without
# them gpu_check.py runs the training and NCCL stages in plain PyTorch and skips the Ray stages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "ijson==3.4.0" "braceexpand==0.1.7" "webdataset==1.0.2"
ls -la .whl
du -sh .whl
