#!/usr/bin/env bash
# The test command (README): installs what it needs, checks the CUDA sources compile, type-checks
# the package with mypy, runs pytest.
#   bash tools/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/_env.sh
source tools/_env_test.sh   # test-only extras: pytest, mypy, scikit-learn, tokenizers, openai, NCCL headers

echo "== compile check of the CUDA kernels (nvcc, compile only)"
bash tools/check_cuda.sh

echo "== mypy (static types of paddle_semoe/, config in pyproject.toml)"
"$PY" -m mypy

echo "== pytest"
"$PY" -m pytest -q "$@"
