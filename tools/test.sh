#!/usr/bin/env bash
# The test command (README): installs what it needs, checks the CUDA sources compile, runs pytest.
#   bash tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/_env.sh

echo "== compile check of the CUDA kernels (nvcc, compile only)"
bash tools/check_cuda.sh

echo "== pytest"
"$PY" -m pytest -q "$@"
