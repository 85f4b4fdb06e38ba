# Sourced by tools/test.sh and tools/quickstart.sh: make a Python with Paddle and this package.
# Installs paddlepaddle==3.3.1 (CPU) only when no Paddle is importable; never paddlepaddle-gpu.
PY=${PYTHON:-python3}
if ! "$PY" -c "import paddle" >/dev/null 2>&1; then
  echo "== no Paddle found: installing paddlepaddle==3.3.1 (CPU) from PyPI"
  "$PY" -m pip install -q "paddlepaddle==3.3.1"
fi
if ! "$PY" -c "import yaml, numpy, pytest, sklearn" >/dev/null 2>&1; then
  # scikit-learn ships the 8x8 digits images of the UFO example (nothing is downloaded at run time)
  "$PY" -m pip install -q pyyaml numpy pytest scikit-learn
fi
if ! "$PY" -c "import paddle_semoe" >/dev/null 2>&1 || [ "$("$PY" -c 'import paddle_semoe,os;print(os.path.dirname(os.path.dirname(os.path.abspath(paddle_semoe.__file__))))')" != "$PWD" ]; then
  echo "== installing paddle-semoe (editable) from $PWD"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
# NCCL's header (from the nvidia-nccl-cu13 wheel) lets tools/check_cuda.sh compile the NCCL code
# of the fused all-to-all too; without it that file's NCCL part is skipped (said in the summary).
if ! "$PY" -c "import nvidia.nccl,os,sys; sys.exit(not any(os.path.isfile(os.path.join(p,'include','nccl.h')) for p in nvidia.nccl.__path__))" >/dev/null 2>&1; then
  "$PY" -m pip install -q nvidia-nccl-cu13 || echo "== nvidia-nccl-cu13 not installed: check_cuda.sh skips the NCCL code of fused_a2a_nccl.cu"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-2}
