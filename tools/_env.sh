# Sourced by every set-up script (tools/quickstart.sh, tools/test.sh): the base every command
# needs, a Python with Paddle, numpy, PyYAML and this package (editable). Installs
# paddlepaddle==3.3.1 (CPU) only when no Paddle is importable; never paddlepaddle-gpu.
# What only some commands use is installed by them: tools/_env_test.sh (tests, mypy, UFO example,
# tokenizers, the openai client, NCCL headers), tools/quickstart.sh (visualdl).
PY=${PYTHON:-python3}
if ! "$PY" -c "import paddle" >/dev/null 2>&1; then
  echo "== no Paddle found: installing paddlepaddle==3.3.1 (CPU) from PyPI"
  "$PY" -m pip install -q "paddlepaddle==3.3.1"
fi
if ! "$PY" -c "import yaml, numpy" >/dev/null 2>&1; then
  "$PY" -m pip install -q pyyaml numpy
fi
if ! "$PY" -c "import paddle_semoe" >/dev/null 2>&1 || [ "$("$PY" -c 'import paddle_semoe,os;print(os.path.dirname(os.path.dirname(os.path.abspath(paddle_semoe.__file__))))')" != "$PWD" ]; then
  echo "== installing paddle-semoe (editable) from $PWD"
  # --no-build-isolation builds with the installed setuptools, which needs 'wheel' before v70.1
  "$PY" -c "import setuptools, wheel" >/dev/null 2>&1 || "$PY" -m pip install -q setuptools wheel
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-2}
