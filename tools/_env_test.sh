# Sourced by tools/test.sh after tools/_env.sh: what the tests, the type check and the examples
# they cover need on top of the base. Each package is installed only when missing.
# pytest; scikit-learn ships the 8x8 digits images of the UFO example (ufo_example/, its tests;
# nothing is downloaded at run time)
if ! "$PY" -c "import pytest, sklearn" >/dev/null 2>&1; then
  "$PY" -m pip install -q pytest scikit-learn
fi
# mypy, pinned: tools/test.sh type-checks paddle_semoe/ with it (config in pyproject.toml)
MYPY_VERSION=2.4.1
if ! "$PY" -c "import sys, mypy.version; sys.exit(mypy.version.__version__ != '$MYPY_VERSION')" >/dev/null 2>&1; then
  "$PY" -m pip install -q "mypy==$MYPY_VERSION"
fi
# Tokenizers of prepared datasets (tools/prepare_data.py, training on data.datasets, tests/data).
if ! "$PY" -c "import tokenizers, sentencepiece" >/dev/null 2>&1; then
  "$PY" -m pip install -q tokenizers sentencepiece
fi
# The openai client: tests/inference/test_server.py drives tools/serve.py's API with it (tests only).
if ! "$PY" -c "import openai" >/dev/null 2>&1; then
  "$PY" -m pip install -q openai
fi
# matplotlib: the PNGs of tools/bench_routing.py and tools/bench_quality.py (their tests check them)
if ! "$PY" -c "import matplotlib" >/dev/null 2>&1; then
  "$PY" -m pip install -q matplotlib
fi
# NCCL's header (from the nvidia-nccl-cu13 wheel) lets tools/check_cuda.sh compile the NCCL code
# of the fused all-to-all too; without it that file's NCCL part is skipped (said in the summary).
if ! "$PY" -c "import nvidia.nccl,os,sys; sys.exit(not any(os.path.isfile(os.path.join(p,'include','nccl.h')) for p in nvidia.nccl.__path__))" >/dev/null 2>&1; then
  "$PY" -m pip install -q nvidia-nccl-cu13 || echo "== nvidia-nccl-cu13 not installed: check_cuda.sh skips the NCCL code of fused_a2a_nccl.cu"
fi
