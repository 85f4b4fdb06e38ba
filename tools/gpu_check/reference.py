"""NumPy reference of the MoE op contract (custom_ops/README.md), written from the contract
text alone, independent of the C++ kernels. Float results are float64.

Storage dtypes of token rows: float32 -> np.float32, float16 -> np.float16, bfloat16 ->
np.uint16 (raw bits; NumPy has no bfloat16). ``encode``/``decode`` convert.

Shapes: T tokens, D hidden, E experts, K top-k, R dispatch rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
# Unit roundoff (half an ulp at 1.0) of each dtype.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


# ------------------------------------------------------------------------- dtypes
def bf16_bits(x) -> np.ndarray:
    """float32 values -> bfloat16 bits (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    out = np.where(nan, (u >> 16) | 0x40, rounded)
    return out.astype(np.uint16)


def bf16_values(bits) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode(values, dtype: str) -> np.ndarray:
    """Float values -> storage array of ``dtype`` (one round-to-nearest-even from float32)."""
    v = np.asarray(values, dtype=np.float32)
    if dtype == "float32":
        return v.copy()
    if dtype == "float16":
        return v.astype(np.float16)
    if dtype == "bfloat16":
        return bf16_bits(v).reshape(v.shape)
    raise ValueError(f"unknown dtype {dtype!r} (expected one of {DTYPES})")


def decode(stored, dtype: str) -> np.ndarray:
    """Storage array of ``dtype`` -> float32 values (exact)."""
    if dtype == "bfloat16":
        s = np.asarray(stored)
        return bf16_values(s).reshape(s.shape)
    if dtype in ("float32", "float16"):
        return np.asarray(stored).astype(np.float32)
    raise ValueError(f"unknown dtype {dtype!r} (expected one of {DTYPES})")


# ------------------------------------------------------------------------- routing
def softmax(logits) -> np.ndarray:
    """Row softmax of [T, E] logits, float64."""
    z = np.asarray(logits, dtype=np.float64)
    if z.size == 0:
        return z.copy()
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits) -> np.ndarray:
    """Elementwise sigmoid of [T, E] logits, float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def scores(logits, score_fn: str = "softmax") -> np.ndarray:
    """Router scores: row softmax or elementwise sigmoid, float64."""
    if score_fn not in SCORE_FNS:
        raise ValueError(f"unknown score_fn {score_fn!r} (expected one of {list(SCORE_FNS)})")
    return sigmoid(logits) if score_fn == "sigmoid" else softmax(logits)


def top_k(probs, k: int, bias=None) -> np.ndarray:
    """ids [T, k] int32: experts by descending selection score probs + bias (bias: None, [E]
    or [T, E], added in float32 as the kernels do), ties to the lower expert index. A stable
    sort of -key keeps equal keys in index order."""
    p = np.asarray(probs)
    key = p if bias is None else (p.astype(np.float32) + np.asarray(bias, np.float32))
    order = np.argsort(-key, axis=1, kind="stable")
    return order[:, :k].astype(np.int32)


def random_routing_keep(probs_f32, ids, noise) -> np.ndarray:
    """keep [T, K] bool. GShard random routing, evaluated in float32 exactly as the contract
    writes it: (t, j >= 1) is dropped when noise[t] >= 2 p_j / (p_0 + p_j)."""
    ids = np.asarray(ids)
    T, K = ids.shape
    keep = np.ones((T, K), dtype=bool)
    if noise is None or K < 2 or T == 0:
        return keep
    p = np.asarray(probs_f32, dtype=np.float32)
    sel = np.take_along_axis(p, ids.astype(np.int64), axis=1)  # [T, K] float32
    p0 = sel[:, :1]
    thr = (np.float32(2.0) * sel) / (p0 + sel)  # float32 arithmetic
    n = np.asarray(noise, dtype=np.float32)[:, None]
    keep[:, 1:] = ~(n >= thr[:, 1:])
    return keep


CAPACITY_SCALE = 1_000_000
# Capacity priority rules by their code (the launcher's `capacity_rule`, routing_rules.h).
CAPACITY_RULES = {"choice": 0, "token": 1, "probs": 2}
# Router score functions by their code (the launcher's `score_fn`).
SCORE_FNS = {"softmax": 0, "sigmoid": 1}


def expert_capacity(T: int, E: int, K: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * T * K / E), exactly in integers from the factor in millionths
    (micro = round(cf * 1e6), as the op's attribute carries it); 0 (dropless) when micro <= 0
    or T == 0. The launchers take the capacity itself, so this only picks test capacities."""
    micro = int(round(capacity_factor * CAPACITY_SCALE)) if capacity_factor > 0 else 0
    if micro <= 0 or T <= 0:
        return 0
    return -(-(micro * T * K) // (E * CAPACITY_SCALE))


def dispatch_rows(T: int, E: int, K: int, capacity: int) -> int:
    """R = T*K (dropless) or min(T*K, E*capacity)."""
    return T * K if capacity <= 0 else min(T * K, E * capacity)


def visit_order(ids, probs, rule: str = "choice", batch_priority: bool = False) -> np.ndarray:
    """[T*K] int64: the assignment a = t*K + j visited v-th under the capacity rule.
    choice: (j, token) ascending; token: (token, j) ascending; with batch_priority the tokens
    are taken by top probability probs[t, ids[t, 0]] descending (ties: lower t first);
    probs: probs[t, ids[t, j]] descending, ties by a (stable sorts throughout)."""
    ids = np.asarray(ids)
    T, K = ids.shape
    if rule not in CAPACITY_RULES:
        raise ValueError(f"unknown capacity rule {rule!r} (expected one of {list(CAPACITY_RULES)})")
    a = np.arange(T * K, dtype=np.int64).reshape(T, K)
    if rule == "probs":
        sel = np.take_along_axis(np.asarray(probs, np.float32), ids.astype(np.int64), axis=1)
        return np.argsort(-sel.reshape(-1), kind="stable")
    if batch_priority:
        top = np.asarray(probs, np.float32)[np.arange(T), ids[:, 0]] if T else np.zeros(0)
        a = a[np.argsort(-top, kind="stable")]
    return (a.T if rule == "choice" else a).reshape(-1)


def assign_positions(ids, keep, E: int, capacity: int, probs=None, rule: str = "choice",
                     batch_priority: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(pos [T, K] int32, counts [E] int32). Assignments visited in the capacity rule's order
    (``visit_order``); a kept one gets rank r = number of earlier visited kept assignments to
    its expert; it stays if capacity <= 0 or r < capacity, at pos = offsets[e] + r (offsets =
    exclusive prefix sum of counts)."""
    ids = np.asarray(ids)
    visit = visit_order(ids, probs, rule, batch_priority)
    flat_ids = ids.reshape(-1).astype(np.int64)[visit]
    flat_keep = np.asarray(keep, dtype=bool).reshape(-1)[visit]
    pos = np.full(flat_ids.shape, -1, dtype=np.int64)
    active = np.flatnonzero(flat_keep)
    experts = flat_ids[active]
    order = np.argsort(experts, kind="stable")  # groups by expert, visit order inside
    sorted_experts = experts[order]
    group_start = np.searchsorted(sorted_experts, sorted_experts, side="left")
    rank = np.empty(active.shape, dtype=np.int64)
    rank[order] = np.arange(active.size) - group_start
    survives = rank < capacity if capacity > 0 else np.ones(active.shape, dtype=bool)
    counts = np.bincount(experts[survives], minlength=E).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    kept_idx = active[survives]
    pos[kept_idx] = offsets[flat_ids[kept_idx]] + rank[survives]
    out = np.empty_like(pos)
    out[visit] = pos  # visit order -> assignment order
    return out.reshape(ids.shape).astype(np.int32), counts.astype(np.int32)


def gather_rows(x_stored, pos, n_rows: int) -> np.ndarray:
    """rows [n_rows, D] (same storage dtype as x): rows[pos[t, j]] = x[t]; the rest zero."""
    x = np.asarray(x_stored)
    pos = np.asarray(pos)
    rows = np.zeros((n_rows, x.shape[1]), dtype=x.dtype)
    t_idx, j_idx = np.nonzero(pos >= 0)
    rows[pos[t_idx, j_idx]] = x[t_idx]
    return rows


@dataclass
class Dispatch:
    """Reference gate-dispatch outputs (float64 where the op writes float32)."""

    rows: np.ndarray
    weights: np.ndarray
    ids: np.ndarray
    pos: np.ndarray
    counts: np.ndarray
    probs: np.ndarray
    keep: np.ndarray
    capacity: int


def gate_dispatch(x_stored, logits, noise, top_k_: int, capacity_factor: float,
                  normalize: bool, rule: str = "choice", batch_priority: bool = False) -> Dispatch:
    """Whole gate-dispatch from logits (float64 softmax; for exact comparisons against a
    float32 kernel use the step functions on the kernel's own probs)."""
    x = np.asarray(x_stored)
    T = x.shape[0]
    E = np.asarray(logits).shape[1]
    probs = softmax(logits)
    ids = top_k(probs, top_k_)
    sel = np.take_along_axis(probs, ids.astype(np.int64), axis=1)
    weights = sel / sel.sum(axis=1, keepdims=True) if normalize and T else sel
    keep = random_routing_keep(probs.astype(np.float32), ids, noise)
    cap = expert_capacity(T, E, top_k_, capacity_factor)
    pos, counts = assign_positions(ids, keep, E, cap, probs.astype(np.float32), rule,
                                   batch_priority)
    rows = gather_rows(x, pos, dispatch_rows(T, E, top_k_, cap))
    return Dispatch(rows, weights, ids, pos, counts, probs, keep, cap)


def gate_dispatch_grad(probs, weights, ids, pos, grad_rows, grad_weights, grad_probs,
                       normalize: bool, hidden: int,
                       score_fn: str = "softmax") -> tuple[np.ndarray, np.ndarray]:
    """(grad_x [T, D], grad_logits [T, E]) in float64. grad_* may be None (zero).

    grad_x[t] = sum over kept j of grad_rows[pos[t, j]];
    gp = grad_probs + dweights/dprobs^T grad_weights, with (normalize, S = sum_j p[ids_j])
    dL/dp_i = (gw_i - sum_j gw_j w_j) / S, else dL/dp_i = gw_i;
    grad_logits = p * (gp - sum_e gp_e p_e) (softmax) or gp * p * (1 - p) (sigmoid)."""
    p = np.asarray(probs, dtype=np.float64)
    ids = np.asarray(ids).astype(np.int64)
    pos = np.asarray(pos)
    T, K = ids.shape
    grad_x = np.zeros((T, hidden), dtype=np.float64)
    if grad_rows is not None:
        g = np.asarray(grad_rows, dtype=np.float64)
        for j in range(K):
            m = pos[:, j] >= 0
            grad_x[m] += g[pos[m, j]]
    gp = np.zeros_like(p) if grad_probs is None else np.array(grad_probs, dtype=np.float64)
    if grad_weights is not None:
        gw = np.asarray(grad_weights, dtype=np.float64)
        if normalize:
            w = np.asarray(weights, dtype=np.float64)
            s = np.take_along_axis(p, ids, axis=1).sum(axis=1, keepdims=True)
            dot = (gw * w).sum(axis=1, keepdims=True)
            contrib = (gw - dot) / s
        else:
            contrib = gw
        rows_idx = np.repeat(np.arange(T), K)
        np.add.at(gp, (rows_idx, ids.reshape(-1)), contrib.reshape(-1))
    if score_fn == "sigmoid":
        return grad_x, gp * p * (1.0 - p)
    s = (gp * p).sum(axis=1, keepdims=True)
    return grad_x, p * (gp - s)


def combine(rows, weights, pos) -> np.ndarray:
    """out [T, D] float64 = sum over pos[t, j] >= 0 of weights[t, j] * rows[pos[t, j]]."""
    r = np.asarray(rows, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    pos = np.asarray(pos)
    T, K = pos.shape
    out = np.zeros((T, r.shape[1]), dtype=np.float64)
    for j in range(K):
        m = pos[:, j] >= 0
        out[m] += w[m, j, None] * r[pos[m, j]]
    return out


def combine_grad(rows, weights, pos, grad_out, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(grad_rows [n_rows, D], grad_weights [T, K]) float64: grad_rows[pos] = w * grad_out[t]
    (unreferenced rows 0); grad_weights = <grad_out[t], rows[pos]> (0 where pos < 0)."""
    r = np.asarray(rows, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    g = np.asarray(grad_out, dtype=np.float64)
    pos = np.asarray(pos)
    T, K = pos.shape
    grad_rows = np.zeros((n_rows, g.shape[1]), dtype=np.float64)
    grad_w = np.zeros((T, K), dtype=np.float64)
    for j in range(K):
        m = pos[:, j] >= 0
        grad_rows[pos[m, j]] = w[m, j, None] * g[m]
        grad_w[m, j] = (g[m] * r[pos[m, j]]).sum(axis=1)
    return grad_rows, grad_w


def expert_count(ids, E: int) -> np.ndarray:
    """counts [E] int32 of ids in [0, E); others ignored."""
    a = np.asarray(ids).reshape(-1).astype(np.int64)
    a = a[(a >= 0) & (a < E)]
    return np.bincount(a, minlength=E).astype(np.int32)


# ------------------------------------------------------------------------- activations
try:  # SciPy's erf is vectorized; libm's math.erf through NumPy is the fallback
    from scipy.special import erf as _scipy_erf
except ImportError:  # pragma: no cover - depends on the machine
    _scipy_erf = None
_py_erf = np.frompyfunc(math.erf, 1, 1)


def erf(x) -> np.ndarray:
    """erf in float64, elementwise (SciPy when installed, else math.erf per element)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x.copy()
    if _scipy_erf is not None:
        return np.asarray(_scipy_erf(x), dtype=np.float64)
    return _py_erf(x).astype(np.float64)


def activation(h, name: str) -> np.ndarray:
    """act(h) in float64: gelu (erf), gelu_tanh, relu, silu."""
    h = np.asarray(h, dtype=np.float64)
    if name == "gelu":
        return 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    if name == "relu":
        return np.maximum(h, 0.0)
    if name == "silu":
        return h / (1.0 + np.exp(-h))
    raise ValueError(f"unknown activation {name!r} (expected one of {ACTIVATIONS})")


def activation_grad(h, name: str) -> np.ndarray:
    """act'(h) in float64 (relu'(0) = 0)."""
    h = np.asarray(h, dtype=np.float64)
    if name == "gelu":
        return 0.5 * (1.0 + erf(h / math.sqrt(2.0))) + h * np.exp(-0.5 * h * h) / math.sqrt(
            2.0 * math.pi)
    if name == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        th = np.tanh(c * (h + 0.044715 * h**3))
        return 0.5 * (1.0 + th) + 0.5 * h * (1.0 - th * th) * c * (1.0 + 3 * 0.044715 * h * h)
    if name == "relu":
        return (h > 0).astype(np.float64)
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-h))
        return s * (1.0 + h * (1.0 - s))
    raise ValueError(f"unknown activation {name!r} (expected one of {ACTIVATIONS})")


def activation_grad_mag(h, name: str) -> np.ndarray:
    """Magnitude of the terms that make up act'(h) before they cancel (for tolerances): a
    float32 evaluation of act'(h) is accurate to a few ulps of this, not of act'(h) itself
    (e.g. gelu_tanh' far left of 0 is a difference of two terms near 1e-3)."""
    h = np.abs(np.asarray(h, dtype=np.float64))
    if name == "gelu":
        return 1.0 + h * np.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    if name == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        return 1.0 + h * c * (1.0 + 3 * 0.044715 * h * h)
    if name == "relu":
        return np.ones_like(h)
    if name == "silu":
        return 1.0 + h
    raise ValueError(f"unknown activation {name!r} (expected one of {ACTIVATIONS})")


def row_experts(counts, rows: int) -> np.ndarray:
    """Expert of each of ``rows`` rows (expert e owns [off_e, off_e + counts[e])), -1 past
    sum(counts)."""
    c = np.maximum(np.asarray(counts, dtype=np.int64), 0)
    owner = np.repeat(np.arange(c.size), c)[:rows]
    out = np.full(rows, -1, dtype=np.int64)
    out[: owner.size] = owner
    return out


def bias_act(h_stored, bias_stored, counts, name: str, dtype: str):
    """(h_new stored, a float64) of bias_act_fwd: h[r] += bias[expert(r)] in float32 then one
    rounding to ``dtype`` (rows with no expert unchanged); a = act(h_new) (before rounding)."""
    h = decode(h_stored, dtype)
    b = decode(bias_stored, dtype)
    owner = row_experts(counts, h.shape[0])
    v = h.copy()
    m = owner >= 0
    v[m] = h[m] + b[owner[m]]  # float32 add, as the kernel
    h_new = encode(v, dtype)
    h_new[~m] = np.asarray(h_stored)[~m]
    return h_new, activation(decode(h_new, dtype), name)


# ------------------------------------------------------------------ fused all-to-all
# Written from the layout contract of paddle_semoe/comm/alltoall.py with plain loops (no code
# from layout.py or a2a_layout.h). C[s, x] = rows EP rank s sends to expert x; expert x lives
# on rank x // El; a sender's rows are expert-major over global experts.

def permute_row_blocks(x, src_start, dst_start, out):
    """``out`` (modified copy) with rows [dst_start[k], dst_start[k+1]) = x rows from
    src_start[k]; other rows of ``out`` unchanged."""
    out = np.array(out, copy=True)
    for k in range(len(src_start)):
        n = int(dst_start[k + 1] - dst_start[k])
        out[dst_start[k] : dst_start[k] + n] = x[src_start[k] : src_start[k] + n]
    return out


def a2a_dispatch(rows, C, El: int) -> list[np.ndarray]:
    """Local rows of every EP rank d: for local expert e, for source s: the rows s sent to
    expert d*El + e, in their order at s."""
    C = np.asarray(C, dtype=np.int64)
    P = C.shape[0]
    out = []
    for d in range(P):
        parts = []
        for e in range(El):
            x = d * El + e
            for s in range(P):
                start = int(C[s, :x].sum())
                parts.append(rows[s][start : start + int(C[s, x])])
        out.append(np.concatenate(parts) if parts else rows[0][:0])
    return out


def a2a_combine(local, C, El: int, out_rows) -> list[np.ndarray]:
    """Inverse of a2a_dispatch: rows back at every sender s, [out_rows[s], ...], rows past
    sum(C[s]) zero."""
    C = np.asarray(C, dtype=np.int64)
    P = C.shape[0]
    out = [np.zeros((int(out_rows[s]),) + local[0].shape[1:], dtype=local[0].dtype) for s in range(P)]
    for d in range(P):
        at = 0
        for e in range(El):
            x = d * El + e
            for s in range(P):
                n = int(C[s, x])
                start = int(C[s, :x].sum())
                out[s][start : start + n] = local[d][at : at + n]
                at += n
    return out

