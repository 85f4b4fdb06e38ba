"""Builds the gpu_check shim library and binds its C API (shim_api.h) through ctypes.

Two builds of the same API:

* ``cuda``: ``shim.cu`` + every ``custom_ops/cuda/*.cu`` compiled by nvcc into one shared
  library (pointers are device memory, allocated through the shim's cudaMalloc);
* ``cpu``: ``shim_cpu.cc`` compiled by g++ over the CPU kernels (host memory), for
  ``check.py --emulate-cpu`` and the CPU tests.

Builds are cached by a hash of every source and flag under ``tools/gpu_check/build/``
(git-ignored), written under a temporary name and renamed, so concurrent runs are safe.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
INCLUDE_DIR = REPO / "custom_ops" / "include"
CUDA_DIR = REPO / "custom_ops" / "cuda"
DEFAULT_BUILD_DIR = HERE / "build"

DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
ACTIVATION_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


class BuildError(RuntimeError):
    """The shim library could not be built."""


class ShimError(RuntimeError):
    """A shim call returned an error code."""


# ----------------------------------------------------------------------------------- build
def _cuda_sources() -> list[Path]:
    return [HERE / "shim.cu"] + sorted(CUDA_DIR.glob("*.cu"))


def _hashed_files(kind: str) -> list[Path]:
    files = sorted(INCLUDE_DIR.rglob("*.h")) + [HERE / "shim_api.h", HERE / "a2a_sim.h"]
    if kind == "cuda":
        files += _cuda_sources() + sorted(CUDA_DIR.glob("*.cuh"))
    else:
        files += [HERE / "shim_cpu.cc"]
    return files


def nccl_paths() -> tuple[str, str]:
    """(include dir holding nccl.h, libnccl.so.2 path) from NCCL_INCLUDE_DIR / SEMOE_NCCL_LIB or
    an installed nvidia-nccl-cu* wheel (PyTorch brings one); "" for what is not found. With the
    header the CUDA shim compiles the NCCL layer of the fused all-to-all (else its stubs)."""
    inc, lib = os.environ.get("NCCL_INCLUDE_DIR", ""), os.environ.get("SEMOE_NCCL_LIB", "")
    try:
        import nvidia.nccl  # type: ignore[import-not-found]

        for base in map(Path, nvidia.nccl.__path__):
            if not inc and (base / "include" / "nccl.h").is_file():
                inc = str(base / "include")
            if not lib and (base / "lib" / "libnccl.so.2").is_file():
                lib = str(base / "lib" / "libnccl.so.2")
    except ImportError:
        pass
    return (inc if inc and (Path(inc) / "nccl.h").is_file() else ""), lib


def detect_cuda_arch() -> str:
    """``sm_XY`` of the first visible GPU (via nvidia-smi), else ``native``."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.split()
        if out:
            major, minor = out[0].strip().split(".")
            return f"sm_{major}{minor}"
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return "native"


def _arch_flags(arch: str) -> list[str]:
    if arch == "native":
        return ["-arch=native"]
    num = arch.removeprefix("sm_")
    return [f"-gencode=arch=compute_{num},code=sm_{num}"]


def _run(cmd: list[str], what: str) -> None:
    logger.debug("%s: %s", what, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n"
                         f"{proc.stdout}{proc.stderr}")


def build_library(kind: str, build_dir: Path | None = None, arch: str | None = None,
                  jobs: int | None = None) -> Path:
    """Build (or reuse) the shim library of ``kind`` ("cuda" or "cpu"); returns its path."""
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"kind must be 'cuda' or 'cpu', got {kind!r}")
    build_dir = Path(build_dir or DEFAULT_BUILD_DIR)
    build_dir.mkdir(parents=True, exist_ok=True)
    if kind == "cuda":
        nvcc = os.environ.get("NVCC", "nvcc")
        if shutil.which(nvcc) is None:
            raise BuildError(f"nvcc not found (looked for {nvcc!r}); set NVCC or PATH")
        arch = arch or detect_cuda_arch()
        common = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xcompiler", "-pthread",
                  "-I", str(INCLUDE_DIR), "-I", str(HERE), *_arch_flags(arch)]
        nccl_inc, _ = nccl_paths()
        if nccl_inc:
            common += ["-isystem", nccl_inc]
        flags = [nvcc, *common]
    else:
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            raise BuildError(f"C++ compiler not found (looked for {cxx!r}); set CXX or PATH")
        flags = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-I", str(INCLUDE_DIR),
                 "-I", str(HERE)]
    h = hashlib.sha256(" ".join(flags).encode())
    for f in _hashed_files(kind):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    lib = build_dir / f"libsemoe_gpu_check_{kind}_{h.hexdigest()[:12]}.so"
    if lib.exists():
        return lib

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
        tmp_lib = Path(tmp) / lib.name
        if kind == "cuda":
            objs = []
            procs = []
            pending = list(_cuda_sources())
            max_jobs = jobs or max(1, min(len(pending), os.cpu_count() or 1))
            while pending or procs:
                while pending and len(procs) < max_jobs:
                    src = pending.pop(0)
                    obj = Path(tmp) / (src.stem + ".o")
                    cmd = [*flags, "-c", str(src), "-o", str(obj)]
                    procs.append((src, cmd, subprocess.Popen(
                        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
                    objs.append(obj)
                src, cmd, proc = procs.pop(0)
                out, _ = proc.communicate()
                if proc.returncode != 0:
                    for _, _, p in procs:
                        p.kill()
                    raise BuildError(f"nvcc failed on {src.name}:\n{' '.join(cmd)}\n{out}")
            _run([flags[0], "-shared", "-Xcompiler", "-pthread", *_arch_flags(arch), "-o",
                  str(tmp_lib), *map(str, objs)], "linking the CUDA shim")
        else:
            _run([*flags, str(HERE / "shim_cpu.cc"), "-o", str(tmp_lib)], "building the CPU shim")
        os.replace(tmp_lib, lib)
    logger.info("built %s in %.1f s", lib.name, time.perf_counter() - t0)
    return lib


# ------------------------------------------------------------------------------- binding
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_U64 = ctypes.c_uint64
_INT = ctypes.c_int

_SIGNATURES: dict[str, tuple[type | None, list]] = {
    "semoe_chk_backend": (_INT, []),
    "semoe_chk_error_string": (ctypes.c_char_p, [_INT]),
    "semoe_chk_device_name": (_INT, [ctypes.c_char_p, _INT]),
    "semoe_chk_malloc": (_INT, [_U64, ctypes.POINTER(_P)]),
    "semoe_chk_free": (_INT, [_P]),
    "semoe_chk_h2d": (_INT, [_P, _P, _U64]),
    "semoe_chk_d2h": (_INT, [_P, _P, _U64]),
    "semoe_chk_memset": (_INT, [_P, _INT, _U64]),
    "semoe_chk_d2d": (_INT, [_P, _P, _U64]),
    "semoe_chk_synchronize": (_INT, []),
    "semoe_chk_spin": (_INT, [_I64]),
    "semoe_chk_event_create": (_INT, [ctypes.POINTER(_P)]),
    "semoe_chk_event_record": (_INT, [_P]),
    "semoe_chk_event_elapsed_ms": (_INT, [_P, _P, ctypes.POINTER(ctypes.c_float)]),
    "semoe_chk_event_destroy": (_INT, [_P]),
    "semoe_chk_expert_count": (_INT, [_P, _I64, _I64, _P]),
    "semoe_chk_gate_dispatch_workspace_bytes": (_U64, [_I64, _I64, _I64]),
    "semoe_chk_gate_dispatch": (_INT, [_P, _INT, _P, _P, _P, _INT, _I64, _I64, _I64, _I64, _I64,
                                       _INT, _INT, _INT, _INT, _I64, _P, _P, _P, _P, _P, _P, _P,
                                       _U64]),
    "semoe_chk_gate_dispatch_grad": (_INT, [_P, _P, _P, _P, _P, _INT, _P, _P, _I64, _I64, _I64,
                                            _I64, _INT, _INT, _P, _P]),
    "semoe_chk_combine": (_INT, [_P, _INT, _P, _P, _I64, _I64, _I64, _P]),
    "semoe_chk_combine_grad_workspace_bytes": (_U64, [_I64]),
    "semoe_chk_combine_grad": (_INT, [_P, _INT, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _P,
                                      _U64, _INT]),
    "semoe_chk_bias_act_fwd": (_INT, [_P, _P, _INT, _P, _P, _I64, _I64, _I64, _INT]),
    "semoe_chk_act_bwd": (_INT, [_P, _P, _P, _INT, _I64, _INT]),
    "semoe_chk_permute_row_blocks": (_INT, [_P, _P, _I64, _P, _P, _I64]),
    "semoe_chk_a2a_simulate": (_INT, [_P, _I64, _I64, _I64, _INT, _INT, _P, _P, _P, _I64]),
    "semoe_chk_nccl_smoke": (_INT, [ctypes.c_char_p, _I64, _I64, ctypes.POINTER(_INT)]),
    "semoe_chk_last_message": (ctypes.c_char_p, []),
}


class Buffer:
    """``nbytes`` of shim memory (device or host) at ``ptr``; ``offset`` bytes past the
    allocation's start (to test misaligned pointers). Freed when garbage-collected."""

    def __init__(self, shim: "Shim", nbytes: int, offset: int = 0):
        self._shim = shim
        raw = _P()
        shim.check(shim.lib.semoe_chk_malloc(nbytes + offset, ctypes.byref(raw)), "malloc")
        self._base = raw.value
        self.ptr = self._base + offset
        self.nbytes = nbytes

    def __del__(self):
        base, self._base = getattr(self, "_base", None), None
        if base is not None:
            try:
                self._shim.lib.semoe_chk_free(base)
            except Exception:  # interpreter shutdown: nothing left to free into
                pass


class Shim:
    """ctypes view of a built shim library, with small helpers for memory and errors."""

    def __init__(self, lib_path: Path | str):
        self.path = Path(lib_path)
        self.lib = ctypes.CDLL(str(self.path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        self.emulated = self.lib.semoe_chk_backend() == 1

    # ---- errors
    def error_string(self, rc: int) -> str:
        return self.lib.semoe_chk_error_string(rc).decode()

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise ShimError(f"{what}: {self.error_string(rc)} (code {rc})")

    def device_name(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.check(self.lib.semoe_chk_device_name(buf, 256), "device_name")
        return buf.value.decode()

    # ---- memory
    def alloc(self, nbytes: int, offset: int = 0) -> Buffer:
        return Buffer(self, int(nbytes), offset)

    def upload(self, array: np.ndarray, offset: int = 0) -> Buffer:
        a = np.ascontiguousarray(array)
        buf = Buffer(self, a.nbytes, offset)
        if a.nbytes:
            self.check(self.lib.semoe_chk_h2d(buf.ptr, a.ctypes.data, a.nbytes), "upload")
        return buf

    def download(self, buf: Buffer, dtype, shape) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if out.nbytes > buf.nbytes:
            raise ValueError(f"download of {out.nbytes} bytes from a {buf.nbytes}-byte buffer")
        if out.nbytes:
            self.check(self.lib.semoe_chk_d2h(out.ctypes.data, buf.ptr, out.nbytes), "download")
        return out

    def fill(self, buf: Buffer, byte_value: int) -> None:
        if buf.nbytes:
            self.check(self.lib.semoe_chk_memset(buf.ptr, byte_value, buf.nbytes), "memset")

    def sync(self, what: str = "synchronize") -> None:
        self.check(self.lib.semoe_chk_synchronize(), what)

    # ---- events
    def event(self) -> int:
        ev = _P()
        self.check(self.lib.semoe_chk_event_create(ctypes.byref(ev)), "event_create")
        return ev.value

    def elapsed_ms(self, start: int, end: int) -> float:
        ms = ctypes.c_float()
        self.check(self.lib.semoe_chk_event_elapsed_ms(start, end, ctypes.byref(ms)), "elapsed")
        return float(ms.value)


def ptr(buf: Buffer | None) -> int | None:
    """Pointer argument of a buffer, or NULL."""
    return None if buf is None else buf.ptr
