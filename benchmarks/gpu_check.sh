#!/usr/bin/env bash
# The one prepared GPU check (issue: fused kernels): correctness of every Triton op against the
# reference on the device, then paper-scale timings with bandwidth vs a device copy.
# Run on a machine with one CUDA GPU; bounded to 8 minutes. Results: benchmarks/results/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p benchmarks/results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 "$PY" benchmarks/gpu_check.py --json benchmarks/results/gpu_check.json "$@"
