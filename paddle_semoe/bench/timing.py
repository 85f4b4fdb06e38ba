"""Timing helpers for benchmarks: thread pinning, median-of-runs timers, GEMM rate probes."""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def set_threads(n: int) -> None:
    """Pin the CPU thread count. Must run before ``import paddle`` (Paddle reads it at start-up)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)


@dataclass(frozen=True)
class Timing:
    median_s: float
    runs: list[float]


def time_fn(fn: Callable[[], object], *, warmup: int = 1, runs: int = 5) -> Timing:
    """Median wall time of ``fn()`` over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), samples)


def paddle_matmul_rate(m: int, k: int, n: int, runs: int = 5) -> float:
    """GFLOP/s of ``paddle.matmul`` for [m, k] @ [k, n] float32."""
    import paddle

    a = paddle.randn([m, k])
    b = paddle.randn([k, n])
    t = time_fn(lambda: float(paddle.matmul(a, b)[0, 0]), runs=runs)
    return 2.0 * m * k * n / t.median_s / 1e9


def onednn_sgemm_call(m: int, k: int, n: int) -> Callable[[], None] | None:
    """A call of oneDNN's ``dnnl_sgemm`` (shipped in the Paddle wheel) on fixed random
    [m, k] @ [k, n] float32 operands, or None if the library is absent."""
    import numpy as np
    import paddle

    lib_path = Path(paddle.__file__).parent / "libs" / "libdnnl.so.3"
    if not lib_path.exists():
        return None
    dnnl = ctypes.CDLL(str(lib_path))
    a = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
    c = np.zeros((m, n), np.float32)
    ptr = lambda x: x.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    i64 = ctypes.c_int64

    def call() -> None:
        dnnl.dnnl_sgemm(
            ctypes.c_char(b"N"), ctypes.c_char(b"N"), i64(m), i64(n), i64(k), ctypes.c_float(1.0),
            ptr(a), i64(k), ptr(b), i64(n), ctypes.c_float(0.0), ptr(c), i64(n),
        )

    return call


def onednn_sgemm_rate(m: int, k: int, n: int, runs: int = 5) -> float | None:
    """GFLOP/s of oneDNN's ``dnnl_sgemm``, or None if absent (see :func:`onednn_sgemm_call`)."""
    call = onednn_sgemm_call(m, k, n)
    if call is None:
        return None
    t = time_fn(call, runs=runs)
    return 2.0 * m * k * n / t.median_s / 1e9


def memcpy_bandwidth(nbytes: int, runs: int = 7) -> float:
    """Bytes/s (read + write counted) of a plain single-call NumPy copy of ``nbytes``."""
    import numpy as np

    src = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    dst = np.empty_like(src)
    t = time_fn(lambda: np.copyto(dst, src), warmup=2, runs=runs)
    return 2.0 * src.nbytes / t.median_s
