#!/usr/bin/env bash
# GPU check of the CUDA launchers, one entry for a machine with a GPU, nvcc, Python and NumPy
# (no Paddle). Builds custom_ops/cuda/*.cu + shim.cu with nvcc, checks every launcher against
# the NumPy reference, times dispatch/combine and their grads, prints a table last.
#   tools/gpu_check/run.sh [check.py options]       e.g. --profile small --no-timing
# With $OUT set, the log and gpu_check.json are written under $OUT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
command -v nvidia-smi >/dev/null 2>&1 &&
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used \
    --format=csv,noheader || echo "run.sh: nvidia-smi not available"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  "$PY" tools/gpu_check/check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
exec "$PY" tools/gpu_check/check.py "$@"
