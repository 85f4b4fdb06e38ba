"""The MoE operators: compiled custom ops with a pure-Paddle reference behind one API.

Backend selection, per call (``backend=``) or per process (``SEMOE_OPS`` environment variable):

* ``"auto"`` (default): use the compiled ops; if they cannot be built, log one loud warning
  and use the reference implementation.
* ``"custom"``: the compiled ops or an :class:`OpsBuildError` (no silent fallback).
* ``"reference"``: the pure-Paddle reference only.

Every op validates its inputs here and raises ``ValueError`` naming the argument, its shape
and dtype, before any kernel runs. Contract of each op: ``custom_ops/README.md``.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType
from typing import NamedTuple

import paddle

from paddle_semoe.ops import reference
from paddle_semoe.ops._build import OpsBuildError, build_and_load
from paddle_semoe.ops.reference import (
    ACTIVATIONS,
    CAPACITY_RULES,
    SCORE_FNS,
    capacity_factor_micro,
    capacity_rule_code,
    dispatch_rows,
    expert_capacity,
)

__all__ = [
    "ACTIVATIONS", "BACKENDS", "CAPACITY_RULES", "CPU_GEMM_PRECISIONS", "LINEAR_ACTIVATIONS",
    "SCORE_FNS", "GateDispatchResult", "OpsBuildError", "add_layer_norm", "adamw_step",
    "capacity_factor_micro", "capacity_rule_code", "causal_attention", "combine",
    "cpu_gemm_backend", "dispatch_rows", "expert_capacity", "expert_count", "fused_linear",
    "gate_dispatch", "grouped_ffn", "grouped_ffn_int4", "grouped_ffn_int8", "layer_norm",
    "resolve_backend", "set_cpu_gemm_precision", "softmax_cross_entropy", "squared_norms",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "custom", "reference")
_ROW_DTYPES_GPU = (paddle.float32, paddle.float16, paddle.bfloat16)


class GateDispatchResult(NamedTuple):
    rows: paddle.Tensor  # [R, D] expert-major token rows (R = dispatch_rows(...))
    weights: paddle.Tensor  # [T, K] float32 combine weights
    ids: paddle.Tensor  # [T, K] int32 chosen experts (even when dropped)
    positions: paddle.Tensor  # [T, K] int32 row in `rows`, or -1 when dropped
    counts: paddle.Tensor  # [E] int32 kept rows per expert
    probs: paddle.Tensor  # [T, E] float32 router probabilities


@functools.lru_cache(maxsize=1)
def _load_library() -> ModuleType:
    return build_and_load()


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    logger.warning(
        "\n%s\npaddle-semoe: compiled MoE ops unavailable, FALLING BACK to the slow pure-Paddle "
        "reference.\n  reason: %s\n  set SEMOE_OPS=custom to make this an error, or "
        "SEMOE_OPS=reference to silence it.\n%s",
        "!" * 78, reason, "!" * 78,
    )


def resolve_backend(backend: str | None = None) -> ModuleType | None:
    """The compiled op module for this backend choice, or None for the reference."""
    choice = backend or os.environ.get("SEMOE_OPS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"ops backend must be one of {BACKENDS}, got {choice!r} (SEMOE_OPS / backend=)")
    if choice == "reference":
        return None
    try:
        return _load_library()
    except OpsBuildError as exc:
        if choice == "custom":
            raise
        _warn_fallback(str(exc).splitlines()[0][:300])
        return None


def cpu_gemm_backend(backend: str | None = None) -> str:
    """Name of the BLAS behind the compiled CPU expert FFN: onednn, cblas or naive."""
    lib = resolve_backend(backend)
    if lib is None:
        return "paddle"
    code = int(lib.semoe_cpu_gemm_backend(paddle.zeros([1], dtype="int32")).numpy()[0])
    return ("onednn", "cblas", "naive")[code]


# ----------------------------------------------------------------------------- validation
def _shape(t: paddle.Tensor) -> list:
    """Static shape, with None for dims unknown until run time (static graphs: -1 or a Value)."""
    return [d if isinstance(d, int) and d >= 0 else None for d in t.shape]


def _same_dim(a, b) -> bool:
    """Equal, or at least one unknown until run time."""
    return a is None or b is None or a == b


def _check_dtype(op: str, arg: str, t: paddle.Tensor, dtype) -> None:
    """``dtype``: a Paddle dtype, or ``"float"``: float32 on CPU (the compiled kernels), float32,
    float16 or bfloat16 on a GPU, or ``"rows"``: as ``"float"``, and in a static graph (export)
    any of the three (the kernel checks the device dtype at run time)."""
    if dtype not in ("float", "rows"):
        if t.dtype != dtype:
            raise ValueError(f"{op}: '{arg}' must be {dtype}, got {t.dtype}")
        return
    place = getattr(t, "place", None)
    wide = dtype == "rows" if place is None else not place.is_cpu_place()
    if wide and t.dtype not in _ROW_DTYPES_GPU:
        raise ValueError(f"{op}: '{arg}' must be float32, float16 or bfloat16, got {t.dtype}")
    if not wide and t.dtype != paddle.float32:
        raise ValueError(f"{op}: '{arg}' must be float32 on CPU, got {t.dtype}")


def _check(op: str, arg: str, t: paddle.Tensor, dtype, *dims) -> list:
    """:func:`_check_dtype` (``dtype`` None: any), then the shape, one entry per dim: a name (any
    size) or ``(name, size)`` (``size`` None: any); returns the static shape, or raises a
    ValueError naming the op, the argument and both shapes."""
    if dtype is not None:
        _check_dtype(op, arg, t, dtype)
    got = _shape(t)
    want = [d if isinstance(d, tuple) else (d, None) for d in dims]
    if len(got) != len(want) or not all(_same_dim(g, w) for g, (_, w) in zip(got, want)):
        shown = ", ".join(n if w is None else f"{n}={w}" for n, w in want)
        raise ValueError(f"{op}: '{arg}' must have shape [{shown}], got {got}")
    return got


# ----------------------------------------------------------------------------- ops
@paddle.jit.not_to_static  # plain Python while tracing: no control-flow rewriting
def expert_count(ids: paddle.Tensor, num_experts: int, *, backend: str | None = None) -> paddle.Tensor:
    """Tokens per expert. ids: int32 of any shape (entries outside [0, E) ignored) -> int32 [E]."""
    op = "expert_count"
    _check_dtype(op, "ids", ids, paddle.int32)
    if num_experts <= 0:
        raise ValueError(f"{op}: num_experts must be positive, got {num_experts}")
    lib = resolve_backend(backend)
    counts = reference.expert_count(ids, num_experts) if lib is None else lib.semoe_expert_count(ids, num_experts)
    counts.stop_gradient = True
    return counts


@paddle.jit.not_to_static  # plain Python while tracing: no control-flow rewriting
def gate_dispatch(
    x: paddle.Tensor, logits: paddle.Tensor, *, top_k: int, capacity_factor: float, normalize: bool,
    noise: paddle.Tensor | None = None, capacity_rule: str = "choice", batch_priority: bool = False,
    min_capacity: int = 0, select_bias: paddle.Tensor | None = None, score_fn: str = "softmax",
    backend: str | None = None,
) -> GateDispatchResult:
    """Fused softmax + top-k + (random routing) + capacity + positions + row permutation.

    Args:
        x: [T, D] token rows (float32 on CPU; also float16/bfloat16 on GPU).
        logits: [T, E] float32 router logits.
        top_k: experts per token, 1 <= K <= E.
        capacity_factor: capacity = max(ceil(cf * T * K / E), min_capacity) rows per expert
            (cf to 1e-6, exact integer arithmetic); <= 0 is dropless.
        normalize: divide the K selected probabilities by their sum.
        noise: optional [T] float32 uniform draws enabling GShard random routing of the
            experts after the first.
        capacity_rule: which assignments keep a slot when an expert overflows (``CAPACITY_RULES``):
            ``choice`` (default: all first choices before any second choice, token order
            within a choice), ``token`` (token-major, the old rule) or ``probs`` (each expert
            keeps its highest-probability assignments, ties by token index).
        batch_priority: V-MoE batch prioritized routing for ``choice``/``token``: tokens are
            taken in order of their top probability (descending, ties by token index).
        min_capacity: floor on the capacity (0: none); ignored when dropless.
        select_bias: optional float32 [E] (one bias per expert, e.g. aux-loss-free balancing) or
            [T, E] (per token, e.g. -inf outside the allowed devices) added to the scores for
            the top-k selection only; weights, probs and gradients never see it.
        score_fn: ``softmax`` (over a token's experts) or ``sigmoid`` (per expert; pair it
            with ``normalize=True`` for DeepSeek-V3's top-k renormalization).
    """
    op = "gate_dispatch"
    xs = _check(op, "x", x, "rows", "T", "D")
    T, E = _check(op, "logits", logits, paddle.float32, "T", "E")
    if not _same_dim(T, xs[0]):
        raise ValueError(f"{op}: logits {[T, E]} and x {xs} disagree on tokens T")
    if not 1 <= top_k <= E:
        raise ValueError(f"{op}: top_k must be in [1, num_experts={E}], got {top_k}")
    rule_code = capacity_rule_code(capacity_rule, batch_priority)
    if score_fn not in SCORE_FNS:
        raise ValueError(f"{op}: score_fn must be one of {SCORE_FNS}, got {score_fn!r}")
    if select_bias is not None:
        _check_dtype(op, "select_bias", select_bias, paddle.float32)
        bs = _shape(select_bias)
        if len(bs) not in (1, 2) or not all(map(_same_dim, bs, [T, E][-len(bs):])):
            raise ValueError(f"{op}: 'select_bias' must have shape [E={E}] or [T={T}, E={E}], got {bs}")
        select_bias = select_bias.detach()
    if min_capacity < 0:
        raise ValueError(f"{op}: min_capacity must be >= 0, got {min_capacity}")
    if noise is not None:
        _check_dtype(op, "noise", noise, paddle.float32)
        if T is not None and noise.size != T:
            raise ValueError(f"{op}: 'noise' must have T={T} elements, got shape {_shape(noise)}")
        noise = noise.reshape([-1])
    lib = resolve_backend(backend)
    if lib is None:
        out = reference.gate_dispatch(x, logits, noise, top_k, capacity_factor, normalize,
                                      capacity_rule, batch_priority, min_capacity, select_bias,
                                      score_fn)
    else:
        empty = paddle.zeros([0], dtype="float32")
        out = lib.semoe_gate_dispatch(
            x, logits, empty if noise is None else noise,
            empty if select_bias is None else select_bias,
            int(top_k), capacity_factor_micro(capacity_factor), bool(normalize), rule_code,
            bool(batch_priority), int(min_capacity), SCORE_FNS.index(score_fn),
        )
    result = GateDispatchResult(*out)
    # Integer outputs carry no gradient; marking them keeps Paddle's autograd from expecting one
    # (an int tensor that looks differentiable cuts the graph where another custom op consumes it).
    for t in (result.ids, result.positions, result.counts):
        t.stop_gradient = True
    return result


@paddle.jit.not_to_static  # plain Python while tracing: no control-flow rewriting
def combine(
    rows: paddle.Tensor, weights: paddle.Tensor, positions: paddle.Tensor, *,
    backend: str | None = None,
) -> paddle.Tensor:
    """Weighted un-permute: out[t] = sum_j weights[t,j] * rows[positions[t,j]] (pos >= 0).

    rows [R, D], weights [T, K] float32, positions [T, K] int32 (unique, or -1) -> [T, D].
    """
    op = "combine"
    _check(op, "rows", rows, "rows", "R", "D")
    ws = _check(op, "weights", weights, paddle.float32, "T", "K")
    ps = _check(op, "positions", positions, paddle.int32, "T", "K")
    if not all(map(_same_dim, ws, ps)):
        raise ValueError(f"{op}: weights {ws} and positions {ps} differ")
    lib = resolve_backend(backend)
    if lib is None:
        return reference.combine(rows, weights, positions)
    return lib.semoe_combine(rows, weights, positions)


def _check_ffn_inputs(op: str, x: paddle.Tensor, counts: paddle.Tensor, activation: str, x_dtype):
    """The arguments every grouped FFN op shares: rows ``x`` [R, D], ``counts`` int32 [E], the
    activation. Returns (E, D)."""
    D = _check(op, "x", x, x_dtype, "R", "D")[1]
    (E,) = _check(op, "counts", counts, paddle.int32, "E")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return E, D


@paddle.jit.not_to_static  # plain Python while tracing: no control-flow rewriting
def grouped_ffn(
    x: paddle.Tensor, counts: paddle.Tensor, w1: paddle.Tensor, b1: paddle.Tensor,
    w2: paddle.Tensor, b2: paddle.Tensor, *, activation: str = "gelu", backend: str | None = None,
) -> paddle.Tensor:
    """Expert FFN over expert-major rows: rows of expert e -> act(x W1[e] + b1[e]) W2[e] + b2[e].

    x [R, D]; counts int32 [E] (expert e owns the next counts[e] rows; rows past the sum
    give zeros); w1 [E, D, F]; b1 [E, F]; w2 [E, F, D]; b2 [E, D] -> [R, D].
    """
    op = "grouped_ffn"
    E, D = _check_ffn_inputs(op, x, counts, activation, "rows")
    F_ = _check(op, "w1", w1, None, ("E", E), ("D", D), "F")[2]
    _check(op, "b1", b1, None, ("E", E), ("F", F_))
    _check(op, "w2", w2, None, ("E", E), ("F", F_), ("D", D))
    _check(op, "b2", b2, None, ("E", E), ("D", D))
    lib = resolve_backend(backend)
    if lib is None:
        return reference.grouped_ffn(x, counts, w1, b1, w2, b2, activation)
    out, _hidden = lib.semoe_grouped_ffn(x, counts, w1, b1, w2, b2, activation)
    return out


def grouped_ffn_int8(
    x: paddle.Tensor, counts: paddle.Tensor, w1: paddle.Tensor, s1: paddle.Tensor,
    b1: paddle.Tensor, w2: paddle.Tensor, s2: paddle.Tensor, b2: paddle.Tensor, *,
    activation: str = "gelu", backend: str | None = None,
) -> paddle.Tensor:
    """Weight-only int8 expert FFN (inference, CPU, no gradient): :func:`grouped_ffn` with
    ``W1[e] = w1[e] * s1[e]`` and ``W2[e] = w2[e] * s2[e]`` (per output channel), the GEMMs
    reading the int8 weights directly and scaling each output once.

    x float32 [R, D]; counts int32 [E]; w1 int8 [E, D, F]; s1, b1 float32 [E, F]; w2 int8
    [E, F, D]; s2, b2 float32 [E, D] -> float32 [R, D]. Equal to :func:`grouped_ffn` on the
    dequantized weights up to float32 rounding; each row's result depends on that row only.
    """
    op = "grouped_ffn_int8"
    E, D = _check_ffn_inputs(op, x, counts, activation, paddle.float32)
    F_ = _check(op, "w1", w1, paddle.int8, ("E", E), ("D", D), "F")[2]
    _check(op, "s1", s1, paddle.float32, ("E", E), ("F", F_))
    _check(op, "b1", b1, paddle.float32, ("E", E), ("F", F_))
    _check(op, "w2", w2, paddle.int8, ("E", E), ("F", F_), ("D", D))
    _check(op, "s2", s2, paddle.float32, ("E", E), ("D", D))
    _check(op, "b2", b2, paddle.float32, ("E", E), ("D", D))
    lib = resolve_backend(backend)
    if lib is None:
        dq1 = w1.astype(paddle.float32) * s1.unsqueeze(1)
        dq2 = w2.astype(paddle.float32) * s2.unsqueeze(1)
        return reference.grouped_ffn(x, counts, dq1, b1, dq2, b2, activation)
    return lib.semoe_grouped_ffn_int8(x, counts, w1, s1, b1, w2, s2, b2, activation)


def _unpack_int4(w: paddle.Tensor) -> paddle.Tensor:
    """uint8 [..., N/2] (column 2m in the low nibble, 2m+1 in the high one) -> float32 [..., N]."""
    v = w.astype(paddle.int32)
    lo = paddle.bitwise_xor(paddle.bitwise_and(v, paddle.full_like(v, 15)), paddle.full_like(v, 8)) - 8
    hi = paddle.bitwise_xor(paddle.floor_divide(v, paddle.full_like(v, 16)), paddle.full_like(v, 8)) - 8
    return paddle.stack([lo, hi], axis=-1).reshape(list(w.shape[:-1]) + [2 * w.shape[-1]]).astype(paddle.float32)


def grouped_ffn_int4(
    x: paddle.Tensor, counts: paddle.Tensor, w1: paddle.Tensor, s1: paddle.Tensor,
    b1: paddle.Tensor, w2: paddle.Tensor, s2: paddle.Tensor, b2: paddle.Tensor, *, group_size: int,
    activation: str = "gelu", backend: str | None = None,
) -> paddle.Tensor:
    """Weight-only int4 expert FFN (inference, CPU, no gradient): :func:`grouped_ffn` with
    ``W[e, k, n] = q[e, k, n] * s[e, k // G, n]`` (G = ``group_size``), the GEMMs reading the
    packed int4 weights directly (``inference.package.quantize_int4`` writes them).

    x float32 [R, D]; counts int32 [E]; w1 uint8 [E, D, F/2]; s1 float32 [E, ceil(D/G), F];
    b1 [E, F]; w2 uint8 [E, F, D/2]; s2 [E, ceil(F/G), D]; b2 [E, D] -> float32 [R, D].
    """
    op = "grouped_ffn_int4"
    E, D = _check_ffn_inputs(op, x, counts, activation, paddle.float32)
    if group_size < 1:
        raise ValueError(f"{op}: group_size must be >= 1, got {group_size}")
    F_ = _check(op, "b1", b1, paddle.float32, ("E", E), "F")[1]
    if D is not None and D % 2 or F_ is not None and F_ % 2:
        raise ValueError(f"{op}: int4 packs two columns per byte: D={D} and F={F_} must be even")
    cdiv = lambda a: None if a is None else -(-a // group_size)  # noqa: E731
    half = lambda a: None if a is None else a // 2  # noqa: E731
    _check(op, "w1", w1, paddle.uint8, ("E", E), ("D", D), ("F/2", half(F_)))
    _check(op, "s1", s1, paddle.float32, ("E", E), ("ceil(D/G)", cdiv(D)), ("F", F_))
    _check(op, "w2", w2, paddle.uint8, ("E", E), ("F", F_), ("D/2", half(D)))
    _check(op, "s2", s2, paddle.float32, ("E", E), ("ceil(F/G)", cdiv(F_)), ("D", D))
    _check(op, "b2", b2, paddle.float32, ("E", E), ("D", D))
    lib = resolve_backend(backend)
    if lib is None:
        dq1 = _unpack_int4(w1) * paddle.repeat_interleave(s1, group_size, axis=1)[:, : w1.shape[1]]
        dq2 = _unpack_int4(w2) * paddle.repeat_interleave(s2, group_size, axis=1)[:, : w2.shape[1]]
        return reference.grouped_ffn(x, counts, dq1, b1, dq2, b2, activation)
    return lib.semoe_grouped_ffn_int4(x, counts, w1, s1, b1, w2, s2, b2, activation, int(group_size))


# ----------------------------------------------------------------------------- dense-model ops
# The fused kernels of the model around the MoE layer (attention, projections, LayerNorm, loss).
# CPU float32 runs the compiled kernels; tensors on a GPU go to Paddle's own ops (the
# reference functions, which Paddle runs with its fused GPU kernels), said once, loudly.
LINEAR_ACTIVATIONS = ("none",) + tuple(ACTIVATIONS)


@functools.lru_cache(maxsize=None)
def _warn_gpu_fallback(op: str) -> None:
    logger.warning(
        "\n%s\npaddle-semoe: %s has no CUDA kernel; GPU tensors use Paddle's own ops for it.\n%s",
        "!" * 78, op, "!" * 78,
    )


def _on_gpu(t: paddle.Tensor) -> bool:
    place = getattr(t, "place", None)
    return place is not None and not place.is_cpu_place()


def _cpu_lib(op: str, tensors: list[paddle.Tensor], backend: str | None) -> ModuleType | None:
    """The compiled module for a CPU call, or None: reference backend, or a GPU tensor."""
    lib = resolve_backend(backend)
    if lib is not None and any(_on_gpu(t) for t in tensors):
        _warn_gpu_fallback(op)
        return None
    return lib


@paddle.jit.not_to_static
def fused_linear(
    x: paddle.Tensor, w: paddle.Tensor, b: paddle.Tensor | None = None, *, activation: str = "none",
    trans_w: bool = False, backend: str | None = None,
) -> paddle.Tensor:
    """``act(x @ W + b)`` with the bias and activation in the GEMM epilogue (oneDNN sgemm).

    x [..., K] float32; W [K, N] (``trans_w``: [N, K], e.g. a tied embedding table); b [N] or
    None; activation one of :data:`LINEAR_ACTIVATIONS`. Returns [..., N]. Gradients for x, W, b.
    """
    op = "fused_linear"
    _check_dtype(op, "x", x, "float")
    if len(x.shape) < 2:
        raise ValueError(f"{op}: 'x' must have shape [..., K], got {_shape(x)}")
    w_dims = [("K", _shape(x)[-1]), "N"]  # the K features of 'x'
    ws = _check(op, "w", w, "float", *(w_dims[::-1] if trans_w else w_dims))
    N = ws[0] if trans_w else ws[1]
    if b is not None:
        _check(op, "b", b, "float", ("N", N))
    if activation not in LINEAR_ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; expected one of {LINEAR_ACTIVATIONS}")
    lib = _cpu_lib(op, [x], backend)
    if lib is None:
        return reference.linear(x, w, b, activation, trans_w)
    if b is None:
        b = paddle.zeros([0], dtype=x.dtype)
    out, _pre = lib.semoe_linear(x, w, b, activation, bool(trans_w))
    return out


def _check_norm_args(op: str, x: paddle.Tensor, gamma: paddle.Tensor, beta: paddle.Tensor) -> None:
    _check_dtype(op, "x", x, "float")
    D = _shape(x)[-1] if len(x.shape) else None
    _check(op, "gamma", gamma, "float", ("D", D))
    _check(op, "beta", beta, "float", ("D", D))


@paddle.jit.not_to_static
def layer_norm(
    x: paddle.Tensor, gamma: paddle.Tensor, beta: paddle.Tensor, *, epsilon: float = 1e-5, backend: str | None = None
) -> paddle.Tensor:
    """LayerNorm over the last dim: x [..., D] float32, gamma/beta [D] -> [..., D]."""
    op = "layer_norm"
    _check_norm_args(op, x, gamma, beta)
    lib = _cpu_lib(op, [x], backend)
    if lib is None:
        return reference.layernorm(x, gamma, beta, epsilon)
    return lib.semoe_layernorm(x, gamma, beta, float(epsilon))[0]


@paddle.jit.not_to_static
def add_layer_norm(
    x: paddle.Tensor, residual: paddle.Tensor, gamma: paddle.Tensor, beta: paddle.Tensor, *,
    epsilon: float = 1e-5, backend: str | None = None,
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Residual add fused with the LayerNorm after it: returns ``(layer_norm(x + residual),
    x + residual)``; both [..., D] float32 and both differentiable."""
    op = "add_layer_norm"
    _check_norm_args(op, x, gamma, beta)
    _check_dtype(op, "residual", residual, "float")
    rs, xs = _shape(residual), _shape(x)
    if len(rs) != len(xs) or not all(map(_same_dim, rs, xs)):
        raise ValueError(f"{op}: 'residual' {rs} must have the shape of 'x' {xs}")
    lib = _cpu_lib(op, [x], backend)
    if lib is None:
        return reference.add_layernorm(x, residual, gamma, beta, epsilon)
    out, s, _mean, _rstd = lib.semoe_add_layernorm(x, residual, gamma, beta, float(epsilon))
    return out, s


@paddle.jit.not_to_static
def softmax_cross_entropy(
    logits: paddle.Tensor, labels: paddle.Tensor, *, ignore_index: int = -100, backend: str | None = None
) -> paddle.Tensor:
    """Mean softmax cross-entropy (nats) over rows with ``label != ignore_index`` (0 if none).

    logits [T, V] float32, labels int64 [T] (or [T, 1]). Returns a 0-D tensor. Only the per-row
    log-sum-exp [T] is kept for the backward (no probability tensor).
    """
    op = "softmax_cross_entropy"
    ls = _check(op, "logits", logits, "float", "T", "V")
    _check_dtype(op, "labels", labels, paddle.int64)
    labels = labels.reshape([-1])
    if not _same_dim(_shape(labels)[0], ls[0]):
        raise ValueError(f"{op}: labels has {_shape(labels)[0]} entries, logits {ls} rows")
    lib = _cpu_lib(op, [logits], backend)
    if lib is None:
        return reference.softmax_cross_entropy(logits, labels, int(ignore_index))
    loss, _lse, _count = lib.semoe_softmax_ce(logits, labels, int(ignore_index))
    return loss.reshape([])


@paddle.jit.not_to_static
def causal_attention(
    qkv: paddle.Tensor, num_heads: int, *, k_past: paddle.Tensor | None = None,
    v_past: paddle.Tensor | None = None, backend: str | None = None,
) -> paddle.Tensor:
    """Fused causal self-attention straight from the qkv projection.

    qkv [B, S, 3*H*Dh] float32 (last dim laid out [3, H, Dh]: q, k, v); k_past / v_past
    [B, H, P, Dh] (a KV cache; None = no past). Query i (position P + i) attends to keys
    0..P+i, scores scaled by 1/sqrt(Dh). Returns [B, S, H*Dh] with heads merged. The kernel
    keeps only a per-query log-sum-exp for the backward (no [S, S] buffer).
    """
    op = "causal_attention"
    B, S, D3 = _check(op, "qkv", qkv, "float", "B", "S", "3*H*Dh")
    if num_heads <= 0:
        raise ValueError(f"{op}: num_heads must be positive, got {num_heads}")
    if D3 is not None and D3 % (3 * num_heads):
        raise ValueError(f"{op}: the last dim of 'qkv' ({D3}) must be 3 * num_heads ({num_heads}) * head_dim")
    if (k_past is None) != (v_past is None):
        raise ValueError(f"{op}: give both k_past and v_past or neither")
    Dh = D3 // (3 * num_heads) if D3 is not None else None
    if k_past is not None:
        dims = (("B", B), ("H", num_heads), "P", ("Dh", Dh))
        ks = _check(op, "k_past", k_past, "float", *dims)
        if ks != _check(op, "v_past", v_past, "float", *dims):
            raise ValueError(f"{op}: k_past {_shape(k_past)} and v_past {_shape(v_past)} differ")
    lib = _cpu_lib(op, [qkv], backend)
    if k_past is None:
        batch = B if B is not None else paddle.shape(qkv)[0]  # symbolic while tracing for export
        k_past = v_past = paddle.zeros([batch, num_heads, 0, Dh], dtype=qkv.dtype)
    if lib is None:
        return reference.causal_attention(qkv, k_past, v_past, num_heads)
    out, _lse = lib.semoe_causal_attention(qkv, k_past, v_past, int(num_heads))
    return out


# ----------------------------------------------------------------------------- optimizer ops


def _tensor_list_lib(op: str, tensors: list[paddle.Tensor], backend: str | None) -> ModuleType | None:
    """The compiled module when every tensor is a float32 CPU tensor, else None (Paddle's ops)."""
    lib = _cpu_lib(op, tensors, backend)
    if lib is not None:
        for i, t in enumerate(tensors):
            if t.dtype != paddle.float32:
                raise ValueError(f"{op}: tensor {i} must be float32 on CPU, got {t.dtype}")
    return lib


def adamw_step(
    params: list[paddle.Tensor], grads: list[paddle.Tensor], moment1: list[paddle.Tensor],
    moment2: list[paddle.Tensor], beta1_pow: list[paddle.Tensor], beta2_pow: list[paddle.Tensor], *,
    lr: float, beta1: float, beta2: float, epsilon: float, weight_decay: float,
    decay_mask: list[bool], grad_scale: float = 1.0, backend: str | None = None,
) -> None:
    """One AdamW step over every tensor of the lists, in place, in one kernel call.

    Same update as Paddle's ``adamw`` kernel (decoupled decay ``lr * weight_decay`` where
    ``decay_mask``; bias correction through the per-tensor beta powers [1], which are advanced
    too). ``grad_scale`` multiplies every gradient first (a clipping coefficient folded in).
    All float32; the lists are parallel (moments shaped like their parameter).
    """
    op = "adamw_step"
    lists = (params, grads, moment1, moment2, beta1_pow, beta2_pow)
    n = len(params)
    names = ("grads", "moment1", "moment2", "beta1_pow", "beta2_pow", "decay_mask")
    for name, lst in zip(names, (*lists[1:], decay_mask)):
        if len(lst) != n:
            raise ValueError(f"{op}: '{name}' holds {len(lst)} entries for {n} parameters")
    if n == 0:
        return
    # the parameters choose the path; the kernel checks every tensor of every list itself
    lib = _tensor_list_lib(op, params, backend)
    lr, beta1, beta2, epsilon, weight_decay, grad_scale = map(
        float, (lr, beta1, beta2, epsilon, weight_decay, grad_scale))
    if lib is not None:  # the kernel checks the sizes itself (naming the list and the index)
        # detached views share the storage: the kernel updates the tensors themselves
        with paddle.no_grad():
            lib.semoe_adamw_step(*([t.detach() for t in lst] for lst in lists), lr, beta1, beta2,
                                 epsilon, weight_decay, [int(bool(d)) for d in decay_mask],
                                 grad_scale)
        return
    for i, (p, g, m1, m2) in enumerate(zip(*lists[:4])):
        if not (g.size == m1.size == m2.size == p.size):
            raise ValueError(f"{op}: parameter {i} {_shape(p)}: grad/moment sizes "
                             f"{g.size}/{m1.size}/{m2.size} differ")
    reference.adamw_step(*lists, lr=lr, beta1=beta1, beta2=beta2, epsilon=epsilon,
                         weight_decay=weight_decay, decay_mask=list(decay_mask),
                         grad_scale=grad_scale)


def squared_norms(tensors: list[paddle.Tensor], *, backend: str | None = None) -> paddle.Tensor:
    """float32 [n] on the host: sum of squares of each tensor (one kernel call on CPU)."""
    if not tensors:
        return paddle.zeros([0], dtype="float32")
    lib = _tensor_list_lib("squared_norms", list(tensors), backend)
    if lib is None:
        return reference.squared_norms(list(tensors))
    return lib.semoe_squared_norms([t.detach() for t in tensors])


# ----------------------------------------------------------------------------- GEMM precision
CPU_GEMM_PRECISIONS = ("float32", "bfloat16", "bfloat16_ffn")  # index = the kernel's code


def set_cpu_gemm_precision(precision: str, *, backend: str | None = None) -> str:
    """Autocast of the CPU GEMMs of the compiled ops: ``bfloat16`` rounds the float32 operands
    of every GEMM (expert/dense FFN, attention projections, head) to bfloat16 and runs oneDNN's
    bf16 GEMM (AVX512-BF16 / AMX), accumulating and writing float32; ``bfloat16_ffn`` does so
    for the FFN GEMMs only (experts and dense FFN), the fused linear layers stay float32.
    Weights, gradients and optimizer states stay float32.
    Process-wide. Returns the precision now in effect (``float32`` when bf16 is unavailable,
    with a warning, or on the reference backend, which always computes in float32)."""
    if precision not in CPU_GEMM_PRECISIONS:
        raise ValueError(f"CPU GEMM precision must be one of {CPU_GEMM_PRECISIONS}, got {precision!r}")
    lib = resolve_backend(backend)
    if lib is None:
        if precision != "float32":
            logger.warning("bfloat16 CPU GEMMs need the compiled ops; the reference backend stays float32")
        return "float32"
    code = int(lib.semoe_set_cpu_gemm_precision(paddle.zeros([1], dtype="int32"), precision).numpy()[0])
    if code < 0:
        logger.warning("oneDNN's bfloat16 GEMM is not available in this Paddle build; CPU GEMMs stay float32")
        return "float32"
    return CPU_GEMM_PRECISIONS[code]
