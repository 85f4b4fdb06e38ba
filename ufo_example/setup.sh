#!/usr/bin/env bash
# One-time setup of the UFO example: the digits images ship inside scikit-learn (no download
# at run time); VisualDL for the dashboards. Installs only what is missing.
#   bash ufo_example/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if ! "$PY" -c "import paddle" >/dev/null 2>&1; then
  echo "== installing paddlepaddle==3.3.1 (CPU)"; "$PY" -m pip install -q "paddlepaddle==3.3.1"
fi
if ! "$PY" -c "import sklearn" >/dev/null 2>&1; then
  echo "== installing scikit-learn (ships the 8x8 digits images)"; "$PY" -m pip install -q scikit-learn
fi
if ! "$PY" -c "import visualdl" >/dev/null 2>&1; then
  echo "== installing visualdl"; "$PY" -m pip install -q visualdl
fi
"$PY" - <<'PY'
from ufo_example.data import load_digit_images
x, y = load_digit_images("digits")
print(f"digits: {x.shape[0]} images of {x.shape[1]}x{x.shape[2]}, classes {sorted(set(y.tolist()))}")
PY
