"""Correctness checks of every launcher against the NumPy reference (reference.py).

Each case draws fresh random inputs, poisons every output buffer (floats: all-ones bits =
NaN; int32: 0x7B7B7B7B, never a valid id/position/count) and the workspace, launches through
the shim, synchronizes, and compares:

* integers and pure copies (ids, positions, counts, dispatched rows, bias-added h): exactly;
* float results: elementwise |got - ref| <= tol * mag + atol, where mag is the sum of the
  magnitudes of the terms that make up the value (so cancellation does not make the test
  flaky) and tol covers float32 accumulation plus one rounding to the output dtype. NaN never
  passes. The normwise error ||got - ref|| / ||ref|| is reported too.

Top-k is checked on the kernel's own float32 probabilities (themselves checked against a
float64 softmax), so the exact tie rule is tested without last-bit noise from exp/sum order.
``repeat=True`` runs the launcher twice on identical inputs and demands bit-identical outputs.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field

import numpy as np

from gpu_check import reference as ref
from gpu_check.native import ACTIVATION_CODES, DTYPE_CODES, Buffer, Shim, ShimError, ptr
from gpu_check.native import nccl_paths as native_nccl_paths

logger = logging.getLogger(__name__)

POISON_FLOAT = 0xFF
POISON_INT = 0x7B
EPS32 = 2.0**-24
ELEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# --------------------------------------------------------------------------- results
@dataclass
class Result:
    op: str
    case: str
    check: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        return f"[{'PASS' if self.ok else 'FAIL'}] {self.op:<20} {self.case:<52} {self.check}" + (
            f": {self.detail}" if self.detail else "")


def rounding_tol(dtype: str, terms: int = 1) -> float:
    """Relative (to mag) tolerance of a value accumulated from ``terms`` float32 terms and
    rounded once to ``dtype``."""
    return 2.0 * ref.UNIT_ROUNDOFF[dtype] + max(terms, 1) * 2.0 * EPS32 + 1e-6


def atol_for(dtype: str) -> float:
    return 6e-8 if dtype == "float16" else 1e-30  # float16 subnormal spacing


@dataclass
class Suite:
    """Runs cases against a shim and collects Results."""

    shim: Shim
    seed: int = 0
    results: list[Result] = field(default_factory=list)
    broken: str | None = None  # set when the device is in an unusable (sticky error) state

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    # ---- recording
    def record(self, op: str, case: str, check: str, ok: bool, detail: str = "") -> bool:
        r = Result(op, case, check, bool(ok), detail)
        self.results.append(r)
        (logger.info if r.ok else logger.error)(r.line())
        return r.ok

    def exact(self, op, case, check, got, want) -> bool:
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            return self.record(op, case, check, False, f"shape {got.shape} != {want.shape}")
        if got.dtype.kind == "f" or want.dtype.kind == "f":  # compare bits (NaN, -0)
            if got.dtype.itemsize != want.dtype.itemsize:
                return self.record(op, case, check, False, f"dtype {got.dtype} != {want.dtype}")
            u = np.dtype(f"u{got.dtype.itemsize}")
            bad = np.ascontiguousarray(got).view(u) != np.ascontiguousarray(want).view(u)
        else:
            bad = got != want
        n_bad = int(np.count_nonzero(bad))
        if n_bad == 0:
            return self.record(op, case, check, True)
        i = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
        return self.record(op, case, check, False,
                           f"{n_bad}/{bad.size} differ; first at {tuple(map(int, i))}: "
                           f"got {got[i]!r}, want {want[i]!r}")

    def close(self, op, case, check, got, want, mag, tol, atol=1e-30) -> bool:
        got = np.asarray(got, dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            return self.record(op, case, check, False, f"shape {got.shape} != {want.shape}")
        if got.size == 0:
            return self.record(op, case, check, True, "empty")
        err = np.abs(got - want)
        allowed = tol * np.asarray(mag, dtype=np.float64) + atol
        bad = ~(err <= allowed)  # NaN fails
        denom = float(np.linalg.norm(want))
        norm_rel = float(np.linalg.norm(np.nan_to_num(got - want, nan=np.inf))) / (
            denom if denom > 0 else 1.0)
        worst = float(np.nanmax(err / np.maximum(allowed, 1e-300))) if np.isfinite(err).any() else float("inf")
        n_bad = int(np.count_nonzero(bad))
        if n_bad == 0:
            return self.record(op, case, check, True,
                               f"max err/allowed {worst:.2g}, norm rel err {norm_rel:.2g}")
        i = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
        return self.record(op, case, check, False,
                           f"{n_bad}/{bad.size} outside tolerance; first at {tuple(map(int, i))}: "
                           f"got {got[i]!r}, want {want[i]!r}, allowed {allowed[i]:.3g}; "
                           f"norm rel err {norm_rel:.3g}")

    # ---- device helpers
    def out(self, nbytes: int, poison: int, offset: int = 0) -> Buffer:
        buf = self.shim.alloc(nbytes, offset)
        self.shim.fill(buf, poison)
        return buf

    def launch(self, what: str, rc: int) -> None:
        self.shim.check(rc, what)
        self.shim.sync(what)

    def guarded(self, op: str, case: str, fn, *args, **kwargs):
        """Run one case; a failure becomes a FAIL result (and stops the suite if the device
        is left in an error state)."""
        if self.broken:
            return self.record(op, case, "run", False, f"skipped: {self.broken}")
        try:
            return fn(*args, **kwargs)
        except (ShimError, ValueError, IndexError) as exc:
            self.record(op, case, "run", False, f"{type(exc).__name__}: {exc}")
            try:
                self.shim.sync("after failure")
            except ShimError as sticky:
                self.broken = f"device error state after {op} {case}: {sticky}"
                logger.error(self.broken)
            return None

    # ---- random data
    def normal(self, shape, scale=1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))

    def rows_of(self, shape, dtype: str, scale=1.0) -> np.ndarray:
        return ref.encode(self.normal(shape, scale), dtype)


# ============================================================================ expert_count
def check_expert_count(s: Suite, n: int, E: int, lo: int, hi: int, repeat: bool = False):
    op, case = "expert_count", f"n={n} E={E} ids in [{lo},{hi})"
    ids = s.rng.integers(lo, hi, size=n, dtype=np.int32)
    ids_d = s.shim.upload(ids)
    counts_d = s.out(4 * E, POISON_INT)
    s.launch(op, s.shim.lib.semoe_chk_expert_count(ptr(ids_d), n, E, counts_d.ptr))
    got = s.shim.download(counts_d, np.int32, (E,))
    s.exact(op, case, "counts", got, ref.expert_count(ids, E))
    if repeat:
        s.shim.fill(counts_d, POISON_INT)
        s.launch(op, s.shim.lib.semoe_chk_expert_count(ptr(ids_d), n, E, counts_d.ptr))
        s.exact(op, case, "deterministic", s.shim.download(counts_d, np.int32, (E,)), got)


# ============================================================================ gate_dispatch
@dataclass
class DispatchSpec:
    T: int
    D: int
    E: int
    K: int
    capacity_factor: float = 1.0
    normalize: bool = True
    noise: bool = False
    dtype: str = "float32"
    logits: str = "normal"  # normal | ties | skewed | empty | uniform
    misalign: bool = False
    repeat: bool = False
    rule: str = "choice"  # capacity rule: choice | token | probs
    batch_priority: bool = False
    score_fn: str = "softmax"  # softmax | sigmoid
    bias: str = "none"  # selection bias: none | expert ([E]) | token ([T, E], with -inf)

    def name(self) -> str:
        flags = [f"cf={self.capacity_factor:g}", "norm" if self.normalize else "raw"]
        if self.rule != "choice":
            flags.append(self.rule)
        if self.batch_priority:
            flags.append("bpr")
        if self.score_fn != "softmax":
            flags.append(self.score_fn)
        if self.bias != "none":
            flags.append(f"bias={self.bias}")
        if self.noise:
            flags.append("noise")
        if self.logits != "normal":
            flags.append(self.logits)
        if self.misalign:
            flags.append("misaligned")
        return (f"T={self.T} D={self.D} E={self.E} K={self.K} {self.dtype} " + " ".join(flags))


@dataclass
class DispatchOut:
    """Device outputs of one dispatch (host copies), for the grad and combine checks."""

    spec: DispatchSpec
    x: np.ndarray
    probs: np.ndarray
    weights: np.ndarray
    ids: np.ndarray
    pos: np.ndarray
    counts: np.ndarray
    rows: np.ndarray
    n_rows: int


def make_logits(s: Suite, spec: DispatchSpec) -> np.ndarray:
    T, E = spec.T, spec.E
    if spec.logits == "ties":
        return (s.rng.integers(0, 3, size=(T, E)) * 0.5).astype(np.float32)
    if spec.logits == "uniform":
        return np.zeros((T, E), dtype=np.float32)
    z = s.normal((T, E), 1.5)
    if spec.logits == "skewed":  # low experts favoured: capacity overflow
        z += np.linspace(3.0, 0.0, E, dtype=np.float32)
    elif spec.logits == "empty":  # two experts nobody picks
        z[:, [1, E - 1]] = -40.0
    return z


def make_bias(s: Suite, spec: DispatchSpec) -> np.ndarray | None:
    """Selection bias of the spec: [E] of magnitude ~ the probabilities, or [T, E] that also
    masks (-inf) all but a random window of ceil(E/2) >= K experts per token."""
    T, E = spec.T, spec.E
    if spec.bias == "none":
        return None
    if spec.bias == "expert":
        return (s.rng.standard_normal(E) * 0.05).astype(np.float32)
    b = (s.rng.standard_normal((T, E)) * 0.05).astype(np.float32)
    width = max(spec.K, (E + 1) // 2)
    start = s.rng.integers(0, E - width + 1, size=T)
    cols = np.arange(E)[None, :]
    b[(cols < start[:, None]) | (cols >= start[:, None] + width)] = -np.inf
    return b


def _launch_dispatch(s, spec, x_d, logits_d, noise_d, cap, n_rows, bufs, ws_d, bias_d=None):
    rows_d, w_d, ids_d, pos_d, counts_d, probs_d = bufs
    for b, p in zip(bufs, (POISON_FLOAT, POISON_FLOAT, POISON_INT, POISON_INT, POISON_INT,
                           POISON_FLOAT)):
        s.shim.fill(b, p)
    s.shim.fill(ws_d, POISON_INT)
    s.launch("gate_dispatch", s.shim.lib.semoe_chk_gate_dispatch(
        ptr(x_d), DTYPE_CODES[spec.dtype], ptr(logits_d), ptr(noise_d), ptr(bias_d),
        int(spec.bias == "token"), spec.T, spec.D, spec.E, spec.K, cap, int(spec.normalize),
        ref.SCORE_FNS[spec.score_fn], ref.CAPACITY_RULES[spec.rule], int(spec.batch_priority),
        n_rows, rows_d.ptr, w_d.ptr, ids_d.ptr, pos_d.ptr,
        counts_d.ptr, probs_d.ptr, ws_d.ptr, ws_d.nbytes))
    T, K, E, D = spec.T, spec.K, spec.E, spec.D
    st = ref.STORAGE[spec.dtype]
    return (s.shim.download(rows_d, st, (n_rows, D)), s.shim.download(w_d, np.float32, (T, K)),
            s.shim.download(ids_d, np.int32, (T, K)), s.shim.download(pos_d, np.int32, (T, K)),
            s.shim.download(counts_d, np.int32, (E,)), s.shim.download(probs_d, np.float32, (T, E)))


def check_gate_dispatch(s: Suite, spec: DispatchSpec) -> DispatchOut | None:
    op, case = "gate_dispatch", spec.name()
    T, D, E, K = spec.T, spec.D, spec.E, spec.K
    x = s.rows_of((T, D), spec.dtype)
    logits = make_logits(s, spec)
    noise = s.rng.random(T, dtype=np.float32) if spec.noise else None
    bias = make_bias(s, spec)
    cap = ref.expert_capacity(T, E, K, spec.capacity_factor)
    n_rows = ref.dispatch_rows(T, E, K, cap)
    off = ELEM_BYTES[spec.dtype] if spec.misalign else 0

    x_d = s.shim.upload(x, offset=off)
    logits_d = s.shim.upload(logits)
    noise_d = s.shim.upload(noise) if noise is not None else None
    bias_d = s.shim.upload(bias) if bias is not None else None
    bufs = (s.shim.alloc(x.itemsize * n_rows * D, off), s.shim.alloc(4 * T * K),
            s.shim.alloc(4 * T * K), s.shim.alloc(4 * T * K), s.shim.alloc(4 * E),
            s.shim.alloc(4 * T * E))
    ws_d = s.shim.alloc(s.shim.lib.semoe_chk_gate_dispatch_workspace_bytes(T, E, K))
    got = _launch_dispatch(s, spec, x_d, logits_d, noise_d, cap, n_rows, bufs, ws_d, bias_d)
    rows, weights, ids, pos, counts, probs = got

    p64 = ref.scores(logits, spec.score_fn)
    ok = s.close(op, case, f"probs vs float64 {spec.score_fn}", probs, p64, p64, 1e-5, 1e-12)
    ok &= s.exact(op, case, "ids (top-k of the kernel's probs + bias, ties to lower index)", ids,
                  ref.top_k(probs, K, bias))
    if not ((ids >= 0) & (ids < E)).all():
        s.record(op, case, "ids in [0, E)", False, "later checks skipped")
        return None
    sel = np.take_along_axis(probs.astype(np.float64), ids.astype(np.int64), axis=1)
    w_ref = sel / sel.sum(axis=1, keepdims=True) if (spec.normalize and T) else sel
    ok &= s.close(op, case, "weights", weights, w_ref, np.abs(w_ref), 1e-5 + K * 2 * EPS32, 1e-12)
    keep = ref.random_routing_keep(probs, ids, noise)
    pos_ref, counts_ref = ref.assign_positions(ids, keep, E, cap, probs, spec.rule,
                                               spec.batch_priority)
    ok &= s.exact(op, case, "counts", counts, counts_ref)
    ok &= s.exact(op, case, "positions", pos, pos_ref)
    ok &= s.exact(op, case, "rows (copies + zero tail)", rows, ref.gather_rows(x, pos_ref, n_rows))
    if spec.repeat:
        again = _launch_dispatch(s, spec, x_d, logits_d, noise_d, cap, n_rows, bufs, ws_d,
                                 bias_d)
        same = all(np.array_equal(a.view(np.uint8), b.view(np.uint8)) for a, b in zip(got, again))
        s.record(op, case, "deterministic (two runs bit-identical)", same)
    if not ok:  # downstream checks need trustworthy positions
        return None
    return DispatchOut(spec, x, probs, weights, ids, pos, counts, rows, n_rows)


# ======================================================================= gate_dispatch_grad
def check_gate_dispatch_grad(s: Suite, d: DispatchOut, variant: str = "all",
                             misalign: bool = False, repeat: bool = False):
    """variant: all | no_rows | no_weights | no_probs (which output grads are missing)."""
    spec = d.spec
    op = "gate_dispatch_grad"
    case = f"{spec.name()} grads={variant}" + (" misaligned" if misalign else "")
    T, D, E, K = spec.T, spec.D, spec.E, spec.K
    off = ELEM_BYTES[spec.dtype] if misalign else 0
    grad_rows = s.rows_of((d.n_rows, D), spec.dtype) if variant != "no_rows" else None
    grad_w = s.normal((T, K)) if variant != "no_weights" else None
    grad_p = s.normal((T, E)) if variant != "no_probs" else None
    dev = [s.shim.upload(a) for a in (d.probs, d.weights, d.ids, d.pos)]
    gr_d = s.shim.upload(grad_rows, offset=off) if grad_rows is not None else None
    gw_d = s.shim.upload(grad_w) if grad_w is not None else None
    gp_d = s.shim.upload(grad_p) if grad_p is not None else None
    st = ref.STORAGE[spec.dtype]
    gx_d = s.shim.alloc(np.dtype(st).itemsize * T * D, off)
    gl_d = s.shim.alloc(4 * T * E)

    def run():
        s.shim.fill(gx_d, POISON_FLOAT)
        s.shim.fill(gl_d, POISON_FLOAT)
        s.launch(op, s.shim.lib.semoe_chk_gate_dispatch_grad(
            *(b.ptr for b in dev), ptr(gr_d), DTYPE_CODES[spec.dtype], ptr(gw_d), ptr(gp_d), T,
            D, E, K, int(spec.normalize), ref.SCORE_FNS[spec.score_fn], gx_d.ptr, gl_d.ptr))
        return s.shim.download(gx_d, st, (T, D)), s.shim.download(gl_d, np.float32, (T, E))

    gx, gl = run()
    gr_vals = ref.decode(grad_rows, spec.dtype) if grad_rows is not None else None
    gx_ref, gl_ref = ref.gate_dispatch_grad(d.probs, d.weights, d.ids, d.pos, gr_vals, grad_w,
                                            grad_p, spec.normalize, D, spec.score_fn)
    gx_mag, _ = ref.gate_dispatch_grad(d.probs, d.weights, d.ids, d.pos,
                                       None if gr_vals is None else np.abs(gr_vals), None, None,
                                       spec.normalize, D)
    s.close(op, case, "grad_x", ref.decode(gx, spec.dtype), gx_ref, gx_mag,
            rounding_tol(spec.dtype, K), atol_for(spec.dtype))
    # magnitude of grad_logits: p * (|gp| + sum |gp| p), from absolute values of the terms.
    p = d.probs.astype(np.float64)
    gp_abs = np.zeros_like(p) if grad_p is None else np.abs(grad_p.astype(np.float64))
    if grad_w is not None:
        ids64 = d.ids.astype(np.int64)
        if spec.normalize:
            sel = np.take_along_axis(p, ids64, axis=1).sum(axis=1, keepdims=True)
            dot = np.abs(grad_w * d.weights).sum(axis=1, keepdims=True)
            contrib = (np.abs(grad_w) + dot) / sel
        else:
            contrib = np.abs(grad_w).astype(np.float64)
        np.add.at(gp_abs, (np.repeat(np.arange(T), K), ids64.reshape(-1)), contrib.reshape(-1))
    if spec.score_fn == "sigmoid":
        gl_mag = gp_abs * p * (1.0 - p)
    else:
        gl_mag = p * (gp_abs + (gp_abs * p).sum(axis=1, keepdims=True))
    s.close(op, case, "grad_logits", gl, gl_ref, gl_mag, 1e-5 + (E + K) * 4 * EPS32, 1e-12)
    if repeat:
        gx2, gl2 = run()
        s.record(op, case, "deterministic (two runs bit-identical)",
                 np.array_equal(gx.view(np.uint8), gx2.view(np.uint8))
                 and np.array_equal(gl.view(np.uint8), gl2.view(np.uint8)))


# ================================================================================ combine
def synthetic_positions(s: Suite, T: int, K: int, n_rows: int, drop: float) -> np.ndarray:
    """Unique positions in [0, n_rows) (n_rows >= T*K), a fraction ``drop`` set to -1."""
    perm = s.rng.permutation(n_rows)[: T * K].astype(np.int32).reshape(T, K)
    perm[s.rng.random((T, K)) < drop] = -1
    return perm


def check_combine(s: Suite, case: str, dtype: str, pos: np.ndarray, n_rows: int, D: int,
                  misalign: bool = False, repeat: bool = False):
    op = "combine"
    T, K = pos.shape
    case = f"T={T} K={K} D={D} R={n_rows} {dtype} {case}" + (" misaligned" if misalign else "")
    off = ELEM_BYTES[dtype] if misalign else 0
    rows = s.rows_of((n_rows, D), dtype)
    w = s.normal((T, K))
    rows_d = s.shim.upload(rows, offset=off)
    w_d, pos_d = s.shim.upload(w), s.shim.upload(pos)
    st = ref.STORAGE[dtype]
    out_d = s.shim.alloc(np.dtype(st).itemsize * T * D, off)

    def run():
        s.shim.fill(out_d, POISON_FLOAT)
        s.launch(op, s.shim.lib.semoe_chk_combine(rows_d.ptr, DTYPE_CODES[dtype], w_d.ptr,
                                                  pos_d.ptr, T, K, D, out_d.ptr))
        return s.shim.download(out_d, st, (T, D))

    out = run()
    r = ref.decode(rows, dtype)
    want = ref.combine(r, w, pos)
    mag = ref.combine(np.abs(r), np.abs(w), pos)
    s.close(op, case, "out", ref.decode(out, dtype), want, mag, rounding_tol(dtype, K),
            atol_for(dtype))
    if repeat:
        s.record(op, case, "deterministic (two runs bit-identical)",
                 np.array_equal(out.view(np.uint8), run().view(np.uint8)))


def check_combine_grad(s: Suite, case: str, dtype: str, pos: np.ndarray, n_rows: int, D: int,
                       mode: str = "workspace", misalign: bool = False, repeat: bool = False):
    """mode: workspace (caller scratch) | no_workspace (zero-all-first path) | stream_alloc."""
    op = "combine_grad"
    T, K = pos.shape
    case = (f"T={T} K={K} D={D} R={n_rows} {dtype} {case} {mode}"
            + (" misaligned" if misalign else ""))
    off = ELEM_BYTES[dtype] if misalign else 0
    rows = s.rows_of((n_rows, D), dtype)
    g = s.rows_of((T, D), dtype)
    w = s.normal((T, K))
    rows_d = s.shim.upload(rows, offset=off)
    g_d = s.shim.upload(g, offset=off)
    w_d, pos_d = s.shim.upload(w), s.shim.upload(pos)
    st = ref.STORAGE[dtype]
    gr_d = s.shim.alloc(np.dtype(st).itemsize * n_rows * D, off)
    gw_d = s.shim.alloc(4 * T * K)
    ws_d = None
    if mode == "workspace":
        ws_d = s.shim.alloc(s.shim.lib.semoe_chk_combine_grad_workspace_bytes(n_rows))

    def run():
        s.shim.fill(gr_d, POISON_FLOAT)
        s.shim.fill(gw_d, POISON_FLOAT)
        if ws_d is not None:
            s.shim.fill(ws_d, POISON_INT)
        s.launch(op, s.shim.lib.semoe_chk_combine_grad(
            rows_d.ptr, DTYPE_CODES[dtype], w_d.ptr, pos_d.ptr, g_d.ptr, T, K, D, n_rows,
            gr_d.ptr, gw_d.ptr, ptr(ws_d), 0 if ws_d is None else ws_d.nbytes,
            1 if mode == "stream_alloc" else 0))
        return s.shim.download(gr_d, st, (n_rows, D)), s.shim.download(gw_d, np.float32, (T, K))

    gr, gw = run()
    r, gv = ref.decode(rows, dtype), ref.decode(g, dtype)
    gr_ref, gw_ref = ref.combine_grad(r, w, pos, gv, n_rows)
    gr_mag, gw_mag = ref.combine_grad(np.abs(r), np.abs(w), pos, np.abs(gv), n_rows)
    s.close(op, case, "grad_rows (unreferenced rows 0)", ref.decode(gr, dtype), gr_ref, gr_mag,
            rounding_tol(dtype), atol_for(dtype))
    s.close(op, case, "grad_weights", gw, gw_ref, gw_mag, max(1e-5, D * EPS32), 1e-30)
    if repeat:
        gr2, gw2 = run()
        s.record(op, case, "deterministic (two runs bit-identical)",
                 np.array_equal(gr.view(np.uint8), gr2.view(np.uint8))
                 and np.array_equal(gw.view(np.uint8), gw2.view(np.uint8)))


# ============================================================================ activations
def act_tol(dtype: str) -> float:
    return 2.0 * ref.UNIT_ROUNDOFF[dtype] + 2e-5


def check_bias_act(s: Suite, rows: int, cols: int, counts: list[int], act: str, dtype: str,
                   misalign: bool = False, repeat: bool = False):
    op = "bias_act_fwd"
    E = len(counts)
    case = (f"rows={rows} cols={cols} E={E} used={sum(counts)} {act} {dtype}"
            + (" misaligned" if misalign else ""))
    off = ELEM_BYTES[dtype] if misalign else 0
    h = s.rows_of((rows, cols), dtype, 2.0)
    bias = s.rows_of((E, cols), dtype)
    cnt = np.asarray(counts, dtype=np.int32)
    st = ref.STORAGE[dtype]
    b_d = s.shim.upload(bias, offset=off)
    c_d = s.shim.upload(cnt)
    a_d = s.shim.alloc(np.dtype(st).itemsize * rows * cols, off)

    def run():
        h_d = s.shim.upload(h, offset=off)
        s.shim.fill(a_d, POISON_FLOAT)
        s.launch(op, s.shim.lib.semoe_chk_bias_act_fwd(h_d.ptr, a_d.ptr, DTYPE_CODES[dtype],
                                                       b_d.ptr, c_d.ptr, E, rows, cols,
                                                       ACTIVATION_CODES[act]))
        return s.shim.download(h_d, st, (rows, cols)), s.shim.download(a_d, st, (rows, cols))

    h_got, a_got = run()
    h_ref, a_ref = ref.bias_act(h, bias, cnt, act, dtype)
    s.exact(op, case, "h (+bias, rounded once)", h_got, h_ref)
    hv = np.abs(ref.decode(h_ref, dtype)).astype(np.float64)
    s.close(op, case, "a = act(h)", ref.decode(a_got, dtype), a_ref, np.abs(a_ref) + 0.01 * hv,
            act_tol(dtype), atol_for(dtype))
    if repeat:
        h2, a2 = run()
        s.record(op, case, "deterministic (two runs bit-identical)",
                 np.array_equal(h_got.view(np.uint8), h2.view(np.uint8))
                 and np.array_equal(a_got.view(np.uint8), a2.view(np.uint8)))


def check_act_bwd(s: Suite, n: int, act: str, dtype: str, misalign: bool = False,
                  repeat: bool = False):
    op = "act_bwd"
    case = f"n={n} {act} {dtype}" + (" misaligned" if misalign else "")
    off = ELEM_BYTES[dtype] if misalign else 0
    h = s.rows_of((n,), dtype, 2.0)
    g = s.rows_of((n,), dtype)
    st = ref.STORAGE[dtype]
    h_d = s.shim.upload(h, offset=off)
    a_d = s.shim.alloc(np.dtype(st).itemsize * n, off)

    def run():
        g_d = s.shim.upload(g, offset=off)
        s.shim.fill(a_d, POISON_FLOAT)
        s.launch(op, s.shim.lib.semoe_chk_act_bwd(h_d.ptr, a_d.ptr, g_d.ptr, DTYPE_CODES[dtype],
                                                  n, ACTIVATION_CODES[act]))
        return s.shim.download(a_d, st, (n,)), s.shim.download(g_d, st, (n,))

    a_got, g_got = run()
    hv = ref.decode(h, dtype)
    gv = ref.decode(g, dtype).astype(np.float64)
    a_ref = ref.activation(hv, act)
    d_ref = ref.activation_grad(hv, act)
    s.close(op, case, "a = act(h)", ref.decode(a_got, dtype), a_ref,
            np.abs(a_ref) + 0.01 * np.abs(hv), act_tol(dtype), atol_for(dtype))
    s.close(op, case, "g * act'(h)", ref.decode(g_got, dtype), gv * d_ref,
            np.abs(gv) * ref.activation_grad_mag(hv, act), act_tol(dtype), atol_for(dtype))
    if repeat:
        a2, g2 = run()
        s.record(op, case, "deterministic (two runs bit-identical)",
                 np.array_equal(a_got.view(np.uint8), a2.view(np.uint8))
                 and np.array_equal(g_got.view(np.uint8), g2.view(np.uint8)))


# ======================================================================== fused all-to-all
def block_table(sizes: np.ndarray, order: np.ndarray, lead: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(src_start [B], dst_start [B + 1]) int64: output blocks = input blocks ``order[k]``
    (empty blocks kept), written from output row ``lead`` on."""
    sizes = np.asarray(sizes, dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(sizes)))[:-1]
    src = starts[order] if sizes.size else np.zeros(0, np.int64)
    dst = lead + np.concatenate(([0], np.cumsum(sizes[order]))) if sizes.size else np.array([lead])
    return np.ascontiguousarray(src, dtype=np.int64), np.ascontiguousarray(dst, dtype=np.int64)


def check_permute_row_blocks(s: Suite, row_bytes: int, sizes, misalign: int = 0, lead: int = 0,
                             tail: int = 0, repeat: bool = False):
    """Random block order over random bytes; rows outside the table must stay poisoned."""
    op = "permute_row_blocks"
    sizes = np.asarray(sizes, dtype=np.int64)
    B = int(sizes.size)
    src, dst = block_table(sizes, s.rng.permutation(B), lead)
    n_in = int(sizes.sum())
    n_out = lead + n_in + tail
    case = (f"B={B} rows={n_in} row_bytes={row_bytes} lead={lead} tail={tail}"
            + (f" misaligned+{misalign}" if misalign else ""))
    x = s.rng.integers(0, 256, size=(n_in, row_bytes), dtype=np.uint8)
    x_d = s.shim.upload(x, offset=misalign)
    out_d = s.shim.alloc(n_out * row_bytes, misalign)

    def run():
        s.shim.fill(out_d, POISON_INT)
        s.launch(op, s.shim.lib.semoe_chk_permute_row_blocks(
            x_d.ptr, out_d.ptr, row_bytes, src.ctypes.data, dst.ctypes.data, B))
        return s.shim.download(out_d, np.uint8, (n_out, row_bytes))

    got = run()
    want = ref.permute_row_blocks(x, src, dst, np.full((n_out, row_bytes), POISON_INT, np.uint8))
    s.exact(op, case, "rows (bit-exact; rows outside the table untouched)", got, want)
    if repeat:
        s.record(op, case, "deterministic (two runs bit-identical)", np.array_equal(got, run()))


def check_permute_rejects_bad_table(s: Suite):
    op, case = "permute_row_blocks", "decreasing dst_start"
    buf = s.shim.alloc(64)
    src = np.array([0, 1], np.int64)
    dst = np.array([0, 2, 1], np.int64)
    rc = s.shim.lib.semoe_chk_permute_row_blocks(buf.ptr, buf.ptr, 16, src.ctypes.data,
                                                 dst.ctypes.data, 2)
    s.record(op, case, "invalid argument reported", rc != 0, s.shim.error_string(rc))
    s.shim.sync(op)  # and no sticky device error


A2A_MODES = ("uneven", "rank_sends_nothing", "rank_receives_nothing", "zeros", "one_hot")


def a2a_counts(s: Suite, P: int, El: int, mode: str, max_rows: int = 6) -> np.ndarray:
    """int64 count matrix [P, P*El] of one pattern."""
    E = P * El
    C = s.rng.integers(0, max_rows + 1, size=(P, E)).astype(np.int64)
    C[s.rng.random((P, E)) < 0.3] = 0
    if mode == "rank_sends_nothing":
        C[s.rng.integers(P)] = 0
    elif mode == "rank_receives_nothing":
        d = int(s.rng.integers(P))
        C[:, d * El : (d + 1) * El] = 0
    elif mode == "zeros":
        C[:] = 0
    elif mode == "one_hot":
        C[:] = 0
        C[:, s.rng.integers(E)] = s.rng.integers(1, max_rows + 1, size=P)
    return np.ascontiguousarray(C)


def _simulate(s: Suite, C, El, node_size, hier, inverse, srcs, dsts, out_rows, row_bytes,
              check: bool = True):
    op = "a2a_exchange"
    for b in dsts:
        s.shim.fill(b, POISON_INT)
    xs = np.array([b.ptr for b in srcs], dtype=np.uint64)
    outs = np.array([b.ptr for b in dsts], dtype=np.uint64)
    rows = np.asarray(out_rows, dtype=np.int64)
    rc = s.shim.lib.semoe_chk_a2a_simulate(C.ctypes.data, C.shape[0], El, node_size, int(hier),
                                           int(inverse), xs.ctypes.data, outs.ctypes.data,
                                           rows.ctypes.data, row_bytes)
    if rc != 0:
        msg = s.shim.lib.semoe_chk_last_message().decode()
        if not check:
            return msg
        raise ShimError(f"a2a_simulate: {msg} ({s.shim.error_string(rc)})")
    s.shim.sync(op)
    return [s.shim.download(b, np.uint8, (int(n), row_bytes)) for b, n in zip(dsts, rows)]


def check_a2a_exchange(s: Suite, P: int, El: int, node_size: int, hier: bool, mode: str,
                       row_bytes: int, max_rows: int = 6, pad: int = 2, extra: int = 1,
                       repeat: bool = False):
    """A whole EP group on this device (a2a_sim.h over a2a::run_route): dispatch gives the
    reference local layout (plus zeroed extra rows), combine brings every row back."""
    op = "a2a_exchange"
    C = a2a_counts(s, P, El, mode, max_rows)
    case = (f"P={P} El={El} node={node_size} {'hier' if hier else 'flat'} {mode} "
            f"row_bytes={row_bytes} rows={int(C.sum())}")
    n_send = C.sum(axis=1)
    R = n_send + pad
    rows = [s.rng.integers(0, 256, size=(int(R[r]), row_bytes), dtype=np.uint8) for r in range(P)]
    local_ref = ref.a2a_dispatch([rows[r][: n_send[r]] for r in range(P)], C, El)
    R_loc = [x.shape[0] for x in local_ref]
    x_d = [s.shim.upload(r) for r in rows]
    loc_d = [s.shim.alloc((n + extra) * row_bytes) for n in R_loc]
    got = _simulate(s, C, El, node_size, hier, False, x_d, loc_d, [n + extra for n in R_loc], row_bytes)
    ok = True
    for d in range(P):
        want = np.concatenate([local_ref[d], np.zeros((extra, row_bytes), np.uint8)])
        ok &= s.exact(op, case, f"dispatch: rows of rank {d} (local expert major, sources "
                      f"ascending; extra rows zero)", got[d], want)
    # combine of fresh rows (expert outputs), read from the first R_loc rows of each buffer
    results = [s.rng.integers(0, 256, size=(n + extra, row_bytes), dtype=np.uint8) for n in R_loc]
    res_d = [s.shim.upload(r) for r in results]
    back_d = [s.shim.alloc(int(n) * row_bytes) for n in R]
    back = _simulate(s, C, El, node_size, hier, True, res_d, back_d, R, row_bytes)
    want_back = ref.a2a_combine([r[:n] for r, n in zip(results, R_loc)], C, El, R)
    for r in range(P):
        ok &= s.exact(op, case, f"combine: rows back at rank {r} (padding zero)", back[r],
                      want_back[r])
    if repeat:
        again = _simulate(s, C, El, node_size, hier, False, x_d, loc_d,
                          [n + extra for n in R_loc], row_bytes)
        s.record(op, case, "deterministic (two runs bit-identical)",
                 all(np.array_equal(a, b) for a, b in zip(got, again)))
    return ok


def check_a2a_rejects_bad_node_size(s: Suite):
    op, case = "a2a_exchange", "node_size=3 with P=4"
    C = np.zeros((4, 4), np.int64)
    bufs = [s.shim.alloc(16) for _ in range(4)]
    msg = _simulate(s, C, 1, 3, True, False, bufs, bufs, [0] * 4, 16, check=False)
    s.record(op, case, "error names the node size", isinstance(msg, str)
             and "node_size=3 must divide the EP group size 4" in msg, str(msg)[:200])


def nccl_smoke(s: Suite, rows: int = 1000, row_bytes: int = 8192) -> dict:
    """The fused all-to-all's NCCL layer on this one GPU (a one-rank group). Returns
    {"status": "ok" | "skipped" | "failed", "detail": ...}; a failure is also a FAIL result."""
    skipped = ctypes.c_int(0)
    _, lib = native_nccl_paths()
    rc = s.shim.lib.semoe_chk_nccl_smoke(lib.encode(), rows, row_bytes, ctypes.byref(skipped))
    detail = s.shim.lib.semoe_chk_last_message().decode()
    if skipped.value:
        return {"status": "skipped", "detail": detail}
    s.record("nccl_smoke", f"rows={rows} row_bytes={row_bytes}", "one-rank NCCL exchange", rc == 0,
             detail if rc == 0 else f"{detail} ({s.shim.error_string(rc)})")
    return {"status": "ok" if rc == 0 else "failed", "detail": detail}


SMALL_PERMUTE = [  # (row_bytes, sizes, misalign, lead, tail, repeat)
    (16, [3, 0, 5, 1, 2, 7, 0, 4], 0, 0, 0, True),
    (8192, [2, 3, 1, 0, 2], 0, 0, 0, False),      # bf16 D=4096 rows, 16-byte packs
    (6, [4, 1, 3, 0, 6, 2, 5], 0, 0, 0, False),   # fp16 D=3: byte path
    (12, [5, 2, 3], 4, 0, 0, False),              # 4-byte packs
    (32, [3, 3, 1, 4], 8, 2, 3, False),           # 8-byte packs, untouched lead/tail rows
    (64, [2, 5, 1, 3], 1, 0, 0, False),           # misaligned by one byte
    (16, [0] * 5, 0, 1, 1, False),                # only empty blocks
    (16, [], 0, 0, 2, False),                     # no blocks
]

SMALL_A2A = [  # (P, El, node_size, hierarchical, row_bytes)
    (1, 3, 1, False, 16), (2, 2, 2, False, 12), (2, 2, 1, True, 6), (4, 2, 2, True, 16),
    (4, 1, 4, True, 64), (4, 3, 1, True, 8), (8, 1, 2, True, 16), (8, 2, 4, False, 4),
    (6, 1, 3, True, 32), (3, 2, 3, True, 16),
]


def run_a2a_suite(s: Suite, profile: str = "small") -> None:
    """The fused all-to-all pieces: the permutation launcher and the simulated group exchange."""
    for row_bytes, sizes, mis, lead, tail, repeat in SMALL_PERMUTE:
        s.guarded("permute_row_blocks", f"row_bytes={row_bytes}", check_permute_row_blocks, s,
                  row_bytes, sizes, mis, lead, tail, repeat)
    many = s.rng.integers(0, 4, size=600)  # three launches of 240 blocks, some empty
    s.guarded("permute_row_blocks", "600 blocks", check_permute_row_blocks, s, 16, many,
              repeat=True)
    s.guarded("permute_row_blocks", "bad table", check_permute_rejects_bad_table, s)
    for i, (P, El, L, hier, row_bytes) in enumerate(SMALL_A2A):
        for j, mode in enumerate(A2A_MODES if P > 1 else ("uneven", "zeros")):
            s.guarded("a2a_exchange", f"P={P} El={El} {mode}", check_a2a_exchange, s, P, El, L,
                      hier, mode, row_bytes, repeat=(i + j) % 7 == 0)
    s.guarded("a2a_exchange", "bad node size", check_a2a_rejects_bad_node_size, s)
    if profile == "full":
        s.guarded("permute_row_blocks", "large", check_permute_row_blocks, s, 8192,
                  s.rng.multinomial(32768, np.ones(64) / 64), repeat=True)
        s.guarded("a2a_exchange", "large", check_a2a_exchange, s, 8, 8, 4, True, "uneven", 8192,
                  max_rows=128, repeat=True)


# ================================================================================= suites
SMALL_DISPATCH = [
    DispatchSpec(0, 64, 8, 2),                                               # T = 0
    DispatchSpec(1, 8, 4, 1, 0.0, normalize=False),                         # K = 1, dropless
    DispatchSpec(37, 33, 5, 5, 0.0, dtype="float16", repeat=True),          # K = E, odd D
    DispatchSpec(256, 128, 8, 2, 0.5, dtype="bfloat16", logits="skewed"),   # overflow
    DispatchSpec(300, 96, 16, 2, 1.0, logits="empty"),                      # empty experts
    DispatchSpec(500, 64, 8, 2, 1.25, noise=True, repeat=True),             # random routing
    DispatchSpec(200, 40, 6, 3, 2.0, normalize=False, noise=True, dtype="float16",
                 misalign=True),
    DispatchSpec(400, 64, 8, 3, 1.0, dtype="bfloat16", logits="ties"),      # many ties
    DispatchSpec(64, 16, 16, 4, 0.0, logits="uniform"),                     # all tied
    DispatchSpec(3000, 16, 64, 6, 1.1, logits="skewed", repeat=True),       # several chunks
    DispatchSpec(64, 32, 300, 4, 1.0),                                      # E > 256 path
    DispatchSpec(16, 8, 13000, 2, 0.0),                                     # > 48 KB smem
    # capacity rules (choice-major is the default above)
    DispatchSpec(256, 32, 8, 2, 0.5, logits="skewed", rule="token"),        # old rule
    DispatchSpec(256, 32, 8, 2, 0.5, logits="skewed", rule="probs", repeat=True),
    DispatchSpec(400, 24, 8, 3, 0.75, dtype="bfloat16", logits="ties", rule="probs"),
    DispatchSpec(300, 16, 6, 2, 0.6, noise=True, rule="probs", misalign=True),
    DispatchSpec(256, 32, 8, 2, 0.5, logits="skewed", batch_priority=True, repeat=True),
    DispatchSpec(400, 24, 8, 3, 0.75, logits="ties", batch_priority=True),
    DispatchSpec(300, 16, 6, 2, 0.6, noise=True, rule="token", batch_priority=True),
    DispatchSpec(3000, 16, 64, 6, 1.1, logits="skewed", rule="probs"),      # several chunks
    DispatchSpec(3000, 16, 64, 6, 1.1, logits="skewed", batch_priority=True),
    DispatchSpec(64, 32, 300, 4, 0.5, rule="probs"),                        # E > 256 path
    DispatchSpec(64, 16, 16, 4, 0.5, logits="uniform", batch_priority=True),  # all tied
    # score functions and selection biases (aux-loss-free, device-limited routing)
    DispatchSpec(300, 32, 16, 4, 1.0, score_fn="sigmoid", repeat=True),
    DispatchSpec(300, 32, 16, 4, 1.0, score_fn="sigmoid", bias="expert", dtype="bfloat16"),
    DispatchSpec(200, 24, 8, 2, 0.75, bias="expert", rule="probs"),
    DispatchSpec(256, 16, 64, 8, 1.0, score_fn="sigmoid", bias="token", repeat=True),
    DispatchSpec(64, 16, 300, 8, 1.0, score_fn="sigmoid", bias="token"),       # E > 256 path
    DispatchSpec(128, 16, 256, 8, 1.25, bias="expert", batch_priority=True),   # fine-grained
]

LARGE_DISPATCH = [
    DispatchSpec(16384, 4096, 64, 2, 1.25, dtype="bfloat16", repeat=True),
    DispatchSpec(16384, 1024, 64, 2, 1.0, dtype="bfloat16", rule="probs", repeat=True),
    DispatchSpec(16384, 1024, 256, 8, 1.0, dtype="bfloat16", batch_priority=True, repeat=True),
    DispatchSpec(16384, 1024, 64, 2, 0.0, dtype="float32", noise=True, repeat=True),
]


def run_suite(s: Suite, profile: str = "small") -> list[Result]:
    """profile: small (CPU emulation / quick) or full (adds the large shapes)."""
    # expert_count
    for n, E, lo, hi in [(0, 4, 0, 4), (1000, 7, -3, 10), (100003, 64, 0, 64),
                         (5000, 5000, -1, 5001), (3000, 20000, 0, 20000)]:
        s.guarded("expert_count", f"n={n} E={E}", check_expert_count, s, n, E, lo, hi,
                  repeat=n == 100003)

    # gate_dispatch, then its grad and combine/combine_grad on the real positions
    specs = SMALL_DISPATCH + (LARGE_DISPATCH if profile == "full" else [])
    for spec in specs:
        d = s.guarded("gate_dispatch", spec.name(), check_gate_dispatch, s, spec)
        if d is None or spec.T == 0:
            continue
        big = spec.T * spec.D > 4_000_000
        variants = ["all"] if big else ["all", "no_rows", "no_weights", "no_probs"]
        for v in variants:
            s.guarded("gate_dispatch_grad", spec.name(), check_gate_dispatch_grad, s, d, v,
                      misalign=spec.misalign, repeat=spec.repeat and v == "all")
        s.guarded("combine", spec.name(), check_combine, s, "dispatch positions", spec.dtype,
                  d.pos, d.n_rows, spec.D, misalign=spec.misalign, repeat=spec.repeat)
        for mode in (["workspace"] if big else ["workspace", "no_workspace", "stream_alloc"]):
            s.guarded("combine_grad", spec.name(), check_combine_grad, s, "dispatch positions",
                      spec.dtype, d.pos, d.n_rows, spec.D, mode=mode, misalign=spec.misalign,
                      repeat=spec.repeat and mode == "workspace")

    # combine on synthetic positions: unreferenced rows, many drops, K = 1, empty
    for T, K, R, D, drop, dtype, mis in [(50, 3, 400, 48, 0.3, "float32", False),
                                         (33, 1, 40, 64, 0.0, "bfloat16", False),
                                         (20, 4, 100, 24, 0.9, "float16", True),
                                         (0, 2, 8, 16, 0.0, "float32", False),
                                         (10, 2, 0, 16, 1.0, "float32", False)]:
        pos = synthetic_positions(s, T, K, max(R, T * K), drop) if R else np.full(
            (T, K), -1, dtype=np.int32)
        name = f"synthetic drop={drop}"
        s.guarded("combine", name, check_combine, s, name, dtype, pos, R, D, misalign=mis)
        for mode in ("workspace", "no_workspace", "stream_alloc"):
            s.guarded("combine_grad", name, check_combine_grad, s, name, dtype, pos, R, D,
                      mode=mode, misalign=mis)

    # element-wise FFN parts
    s.guarded("bias_act_fwd", "rows=0", check_bias_act, s, 0, 16, [0, 0], "gelu", "float32")
    s.guarded("bias_act_fwd", "odd", check_bias_act, s, 37, 33, [10, 0, 7, 3, 0], "silu",
              "float32", repeat=True)
    for i, act in enumerate(ref.ACTIVATIONS):
        for dtype in ref.DTYPES:
            counts = s.rng.multinomial(512, np.ones(8) / 8).tolist()
            counts[i % 8] = 0
            used = sum(counts)
            s.guarded("bias_act_fwd", act, check_bias_act, s, used, 256, counts, act, dtype)
    s.guarded("bias_act_fwd", "tail", check_bias_act, s, 300, 40, [100, 50], "gelu_tanh",
              "float16", misalign=True)
    s.guarded("bias_act_fwd", "many experts", check_bias_act, s, 700, 8, [1] * 600, "relu",
              "bfloat16")
    s.guarded("act_bwd", "n=0", check_act_bwd, s, 0, "gelu", "float32")
    for act in ref.ACTIVATIONS:
        for dtype in ref.DTYPES:
            s.guarded("act_bwd", act, check_act_bwd, s, 4096 + 24, act, dtype)
        s.guarded("act_bwd", act, check_act_bwd, s, 1001, act, "float16", misalign=True,
                  repeat=act == "gelu")
    if profile == "full":
        s.guarded("bias_act_fwd", "large", check_bias_act, s, 32768, 1024,
                  s.rng.multinomial(32768, np.ones(64) / 64).tolist(), "gelu", "bfloat16",
                  repeat=True)
        s.guarded("act_bwd", "large", check_act_bwd, s, 1 << 22, "gelu", "bfloat16", repeat=True)
    run_a2a_suite(s, profile)
    return s.results


def summary(results: list[Result]) -> tuple[int, int]:
    """(passed, total)."""
    return sum(r.ok for r in results), len(results)

