#!/usr/bin/env bash
# Compile-checks every custom_ops/cuda/*.cu with nvcc for sm_80 and sm_90 (no GPU needed), and
# syntax-checks custom_ops/cuda/*.cc against Paddle's headers when those are installed.
# Warnings are errors (nvcc: all-warnings; host compiler: -Wall -Wextra -Werror).
# NCCL (custom_ops/cuda/fused_a2a_nccl.cu): nccl.h comes from NCCL_INCLUDE_DIR, else the
# nvidia-nccl-cu* wheel of $PYTHON, else the system; without one, the NCCL branch of that file
# is not compiled (only its stubs) and the summary line says so.
# Exit status: 0 all compiled; 1 a file failed; 0 with a SKIP line only when nvcc is absent.
#
# Usage: tools/check_cuda.sh [-j JOBS]     (NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
JOBS="${CHECK_CUDA_JOBS:-2}"
if [[ "${1:-}" == "-j" && -n "${2:-}" ]]; then JOBS="$2"; fi

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda: SKIP (nvcc not found on PATH; set NVCC to check the CUDA sources)"
  exit 0
fi

shopt -s nullglob
SOURCES=("$ROOT"/custom_ops/cuda/*.cu)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "check_cuda: FAIL (no custom_ops/cuda/*.cu found)" >&2
  exit 1
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
PY="${PYTHON:-python3}"

# nccl.h for the fused all-to-all: NCCL_INCLUDE_DIR, else the nvidia-nccl-cu* wheel.
NCCL_INC="${NCCL_INCLUDE_DIR:-}"
if [[ -z "$NCCL_INC" ]]; then
  NCCL_INC="$("$PY" -c '
import os
try:
    import nvidia.nccl as m
    print(next(os.path.join(p, "include") for p in m.__path__ if os.path.isfile(os.path.join(p, "include", "nccl.h"))))
except Exception:
    pass' 2>/dev/null || true)"
fi
if [[ -n "$NCCL_INC" && -f "$NCCL_INC/nccl.h" ]]; then
  NCCL_VERSION="$(sed -n 's/^#define NCCL_\(MAJOR\|MINOR\|PATCH\) *\([0-9]*\).*/\2/p' "$NCCL_INC/nccl.h" | paste -sd. -)"
  NCCL_NOTE="; NCCL ${NCCL_VERSION:-?} header from $NCCL_INC"
elif [[ -f /usr/include/nccl.h || -f "${CUDA_HOME:-/usr/local/cuda}/include/nccl.h" ]]; then
  NCCL_INC=""
  NCCL_NOTE="; system nccl.h"
else
  NCCL_INC=""
  NCCL_NOTE="; NCCL header NOT found: the NCCL code of fused_a2a_nccl.cu was skipped (stubs only; pip install nvidia-nccl-cu13 or set NCCL_INCLUDE_DIR)"
fi

# One job per file; each builds both architectures in one nvcc call.
compile_one() {
  local src="$1" work="$2" root="$3" nvcc="$4" nccl_inc="$5"
  local name
  name="$(basename "$src" .cu)"
  if "$nvcc" -std=c++17 -O3 -I "$root/custom_ops/include" ${nccl_inc:+-isystem "$nccl_inc"} \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
      -c "$src" -o "$work/$name.o" >"$work/$name.log" 2>&1; then
    echo "ok $name" >"$work/$name.status"
  else
    echo "FAIL $name" >"$work/$name.status"
  fi
}
export -f compile_one

printf '%s\n' "${SOURCES[@]}" |
  xargs -P "$JOBS" -I{} bash -c 'compile_one "$@"' _ {} "$WORK" "$ROOT" "$NVCC" "$NCCL_INC"

FAILED=()
for src in "${SOURCES[@]}"; do
  name="$(basename "$src" .cu)"
  if ! grep -q '^ok ' "$WORK/$name.status" 2>/dev/null; then
    FAILED+=("$name.cu")
    echo "---- nvcc output for custom_ops/cuda/$name.cu ----" >&2
    cat "$WORK/$name.log" >&2 || true
  fi
done

# custom_ops/cuda/*.cc and the bindings in custom_ops/cpu use Paddle's C++ API (built only when Paddle has CUDA): syntax-check
# them with the host compiler when Paddle's headers and the CUDA headers are installed.
# -DPADDLE_NO_PYTHON only leaves out Paddle's pybind/ATen-compat headers (they need cuBLAS
# and cuDNN headers that a CPU machine lacks); everything the sources use is still parsed.
CC_NOTE=""
CC_SOURCES=("$ROOT"/custom_ops/cuda/*.cc "$ROOT"/custom_ops/cpu/*.cc)  # bindings too, with their CUDA branches on
if [[ ${#CC_SOURCES[@]} -gt 0 ]]; then
  PADDLE_INC="$("$PY" -c 'import importlib.util as u, os; s = u.find_spec("paddle"); print(os.path.join(os.path.dirname(s.origin), "include") if s else "")' 2>/dev/null || true)"
  CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"
  PY_INC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)"
  CXX_BIN="${CXX:-g++}"
  if [[ -n "$PADDLE_INC" && -d "$PADDLE_INC" && -f "$CUDA_INC/cuda_runtime.h" ]] &&
      command -v "$CXX_BIN" >/dev/null 2>&1; then
    for src in "${CC_SOURCES[@]}"; do
      name="$(basename "$src")"
      if ! "$CXX_BIN" -std=c++17 -fsyntax-only -fopenmp -Wall -Wextra -Werror \
          -DPADDLE_WITH_CUDA -DPADDLE_NO_PYTHON \
          -isystem "$PADDLE_INC" -isystem "$PADDLE_INC/third_party" \
          -isystem "$PADDLE_INC/paddle/phi/api/include/compat" \
          -isystem "$PADDLE_INC/paddle/phi/api/include/compat/torch/csrc/api/include" \
          -isystem "$CUDA_INC" -isystem "$CUDA_INC/cccl" ${PY_INC:+-isystem "$PY_INC"} \
          ${NCCL_INC:+-isystem "$NCCL_INC"} \
          -I "$ROOT/custom_ops/include" -I "$ROOT/custom_ops/cpu" \
          "$src" >"$WORK/$name.log" 2>&1; then
        FAILED+=("$name")
        echo "---- $CXX_BIN -fsyntax-only output for $src ----" >&2
        cat "$WORK/$name.log" >&2
      fi
    done
    CC_NOTE="; ${#CC_SOURCES[@]} .cc syntax-checked against Paddle headers"
  else
    CC_NOTE="; .cc not checked (needs Paddle's headers and $CUDA_INC/cuda_runtime.h)"
  fi
fi

ELAPSED=$(( $(date +%s) - START ))
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "check_cuda: FAIL ${#FAILED[@]} file(s) (${FAILED[*]}) in ${ELAPSED}s" >&2
  exit 1
fi
echo "check_cuda: OK ${#SOURCES[@]} .cu files compiled for sm_80+sm_90 with warnings as errors${CC_NOTE}${NCCL_NOTE} in ${ELAPSED}s ($("$NVCC" --version | grep -o 'release [0-9.]*'))"
