"""Timing of dispatch, combine and their grads against the memory-bandwidth floor.

Method (tools/.library METHOD.md): warm up, then for every repetition flush L2 (a memset of a
buffer larger than any L2), keep the GPU busy with a short spin kernel while the host enqueues,
and time only the op with events; report the median. The floor of an op is the bytes it must
move (every input read once, every output written once) over a measured large device-to-device
copy bandwidth (bytes read + bytes written per second).

Under --emulate-cpu the "events" are host timestamps around synchronous CPU kernels: the
numbers are meaningless and are reported only to exercise this code.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass

import numpy as np

from gpu_check import reference as ref
from gpu_check.native import DTYPE_CODES, Buffer, Shim, ptr

logger = logging.getLogger(__name__)

SPIN_NS = 200_000  # host enqueue time to hide behind device work (generous)
FLUSH_BYTES = 256 << 20  # larger than the L2 of an H100 (50 MB) or H200 (60 MB)


@dataclass
class Timing:
    op: str
    dtype: str
    shape: str
    median_us: float
    min_us: float
    floor_bytes: int
    gbps: float  # floor_bytes / median time
    pct_copy: float  # gbps over the measured copy bandwidth, in percent
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


def time_op(shim: Shim, fn, warmup: int, reps: int, flush: Buffer | None) -> list[float]:
    """Device times (ms) of ``fn`` (which enqueues work and checks its return code)."""
    for _ in range(warmup):
        fn()
    shim.sync("warm-up")
    events = [(shim.event(), shim.event()) for _ in range(reps)]
    try:
        for start, end in events:
            if flush is not None:
                shim.fill(flush, 0)
            shim.check(shim.lib.semoe_chk_spin(SPIN_NS), "spin")
            shim.check(shim.lib.semoe_chk_event_record(start), "event_record")
            fn()
            shim.check(shim.lib.semoe_chk_event_record(end), "event_record")
        shim.sync("timed runs")
        return [shim.elapsed_ms(a, b) for a, b in events]
    finally:
        for a, b in events:
            shim.lib.semoe_chk_event_destroy(a)
            shim.lib.semoe_chk_event_destroy(b)


def copy_bandwidth(shim: Shim, nbytes: int, warmup: int, reps: int) -> tuple[float, float]:
    """(GB/s counting bytes read + written, median ms) of a device-to-device copy."""
    src, dst = shim.alloc(nbytes), shim.alloc(nbytes)
    shim.fill(src, 0x3C)
    times = time_op(shim, lambda: shim.check(shim.lib.semoe_chk_d2d(dst.ptr, src.ptr, nbytes),
                                             "d2d"), warmup, reps, None)
    med = statistics.median(times)
    return 2.0 * nbytes / (med * 1e-3) / 1e9, med


def time_routing_ops(shim: Shim, T: int, D: int, E: int, K: int, dtype: str,
                     copy_gbps: float, warmup: int, reps: int, seed: int,
                     flush: Buffer | None) -> list[Timing]:
    """Times gate_dispatch, gate_dispatch_grad, combine and combine_grad (dropless, random
    routing logits, normalized weights) at one shape."""
    rng = np.random.default_rng(seed)
    es = np.dtype(ref.STORAGE[dtype]).itemsize
    dt = DTYPE_CODES[dtype]
    shape = f"T={T} D={D} E={E} K={K}"
    cap = 0
    n_rows = ref.dispatch_rows(T, E, K, cap)

    x_d = shim.upload(ref.encode(rng.standard_normal((T, D), dtype=np.float32), dtype))
    logits_d = shim.upload(rng.standard_normal((T, E), dtype=np.float32))
    rows_d = shim.alloc(es * n_rows * D)
    w_d, ids_d, pos_d = shim.alloc(4 * T * K), shim.alloc(4 * T * K), shim.alloc(4 * T * K)
    counts_d, probs_d = shim.alloc(4 * E), shim.alloc(4 * T * E)
    ws_d = shim.alloc(shim.lib.semoe_chk_gate_dispatch_workspace_bytes(T, E, K))

    def dispatch():
        shim.check(shim.lib.semoe_chk_gate_dispatch(
            x_d.ptr, dt, logits_d.ptr, None, None, 0, T, D, E, K, cap, 1, 0, 0, 0, n_rows,
            rows_d.ptr, w_d.ptr,
            ids_d.ptr, pos_d.ptr, counts_d.ptr, probs_d.ptr, ws_d.ptr, ws_d.nbytes), "dispatch")

    dispatch()
    shim.sync("dispatch")
    kept = int(shim.download(counts_d, np.int32, (E,)).sum())

    grad_rows_d = shim.upload(ref.encode(rng.standard_normal((n_rows, D), dtype=np.float32), dtype))
    gw_d = shim.upload(rng.standard_normal((T, K), dtype=np.float32))
    gp_d = shim.upload(rng.standard_normal((T, E), dtype=np.float32))
    gx_d, gl_d = shim.alloc(es * T * D), shim.alloc(4 * T * E)
    out_d = shim.alloc(es * T * D)
    grad_out_d = shim.upload(ref.encode(rng.standard_normal((T, D), dtype=np.float32), dtype))
    grad_rows_out_d, grad_w_d = shim.alloc(es * n_rows * D), shim.alloc(4 * T * K)
    cws_d = shim.alloc(shim.lib.semoe_chk_combine_grad_workspace_bytes(n_rows))

    def dispatch_grad():
        shim.check(shim.lib.semoe_chk_gate_dispatch_grad(
            probs_d.ptr, w_d.ptr, ids_d.ptr, pos_d.ptr, grad_rows_d.ptr, dt, gw_d.ptr, gp_d.ptr,
            T, D, E, K, 1, 0, gx_d.ptr, gl_d.ptr), "dispatch_grad")

    def combine():
        shim.check(shim.lib.semoe_chk_combine(rows_d.ptr, dt, w_d.ptr, pos_d.ptr, T, K, D,
                                              out_d.ptr), "combine")

    def combine_grad():
        shim.check(shim.lib.semoe_chk_combine_grad(
            rows_d.ptr, dt, w_d.ptr, pos_d.ptr, grad_out_d.ptr, T, K, D, n_rows,
            grad_rows_out_d.ptr, grad_w_d.ptr, ptr(cws_d), cws_d.nbytes, 0), "combine_grad")

    small = 4 * T * K  # one [T, K] int32/float32 array
    floors = {
        # x once, logits; rows (kept copies + zero tail), weights/ids/pos, counts, probs
        "gate_dispatch": es * T * D + 4 * T * E + es * n_rows * D + 3 * small + 4 * E + 4 * T * E,
        # referenced grad rows, probs + grad_probs, weights/ids/pos/grad_weights; grad_x, grad_logits
        "gate_dispatch_grad": es * kept * D + 8 * T * E + 4 * small + es * T * D + 4 * T * E,
        # referenced rows, weights/pos; out
        "combine": es * kept * D + 2 * small + es * T * D,
        # referenced rows, grad_out, weights/pos; grad_rows (all n_rows), grad_weights
        "combine_grad": es * kept * D + es * T * D + 2 * small + es * n_rows * D + small,
    }
    out = []
    for name, fn in (("gate_dispatch", dispatch), ("gate_dispatch_grad", dispatch_grad),
                     ("combine", combine), ("combine_grad", combine_grad)):
        times = time_op(shim, fn, warmup, reps, flush)
        med = statistics.median(times)
        gbps = floors[name] / (med * 1e-3) / 1e9 if med > 0 else float("inf")
        out.append(Timing(name, dtype, shape, med * 1e3, min(times) * 1e3, floors[name], gbps,
                          100.0 * gbps / copy_gbps if copy_gbps > 0 else float("nan"), reps))
        logger.info("timed %s %s %s: median %.1f us", name, dtype, shape, med * 1e3)
    return out


def time_permute(shim: Shim, R: int, D: int, B: int, dtype: str, copy_gbps: float, warmup: int,
                 reps: int, seed: int, flush: Buffer | None) -> Timing:
    """Times permute_row_blocks (the fused all-to-all's Permute step) moving R rows of D
    elements in B blocks of random sizes and random order; floor: every row read once and
    written once."""
    rng = np.random.default_rng(seed)
    row_bytes = np.dtype(ref.STORAGE[dtype]).itemsize * D
    sizes = rng.multinomial(R, np.ones(B) / B).astype(np.int64)
    order = rng.permutation(B)
    starts = np.concatenate(([0], np.cumsum(sizes)))[:-1]
    src = np.ascontiguousarray(starts[order], dtype=np.int64)
    dst = np.ascontiguousarray(np.concatenate(([0], np.cumsum(sizes[order]))), dtype=np.int64)
    x_d, out_d = shim.alloc(R * row_bytes), shim.alloc(R * row_bytes)
    shim.fill(x_d, 0x3C)

    def permute():
        shim.check(shim.lib.semoe_chk_permute_row_blocks(x_d.ptr, out_d.ptr, row_bytes,
                                                         src.ctypes.data, dst.ctypes.data, B),
                   "permute_row_blocks")

    times = time_op(shim, permute, warmup, reps, flush)
    med = statistics.median(times)
    floor = 2 * R * row_bytes
    gbps = floor / (med * 1e-3) / 1e9 if med > 0 else float("inf")
    logger.info("timed a2a_permute %s R=%d D=%d B=%d: median %.1f us", dtype, R, D, B, med * 1e3)
    return Timing("a2a_permute", dtype, f"R={R} D={D} B={B}", med * 1e3, min(times) * 1e3, floor,
                  gbps, 100.0 * gbps / copy_gbps if copy_gbps > 0 else float("nan"), reps)
