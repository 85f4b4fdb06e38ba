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
from paddle_semoe.ops.reference import ACTIVATIONS, capacity_factor_micro, dispatch_rows, expert_capacity

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "GateDispatchResult",
    "OpsBuildError",
    "combine",
    "cpu_gemm_backend",
    "dispatch_rows",
    "capacity_factor_micro",
    "expert_capacity",
    "expert_count",
    "gate_dispatch",
    "grouped_ffn",
    "resolve_backend",
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
        "!" * 78,
        reason,
        "!" * 78,
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


def _check_rows_dtype(op: str, arg: str, t: paddle.Tensor) -> None:
    place = getattr(t, "place", None)
    if place is None:  # static graph (export): the kernel checks the device dtype at run time
        if t.dtype not in _ROW_DTYPES_GPU:
            raise ValueError(f"{op}: '{arg}' must be float32, float16 or bfloat16, got {t.dtype}")
        return
    on_gpu = not place.is_cpu_place()
    allowed = _ROW_DTYPES_GPU if on_gpu else (paddle.float32,)
    if t.dtype not in allowed:
        where = "GPU" if on_gpu else "CPU"
        names = ", ".join(str(d).replace("paddle.", "") for d in allowed)
        raise ValueError(f"{op}: '{arg}' must be {names} on {where}, got {t.dtype}")


def _check_rank(op: str, arg: str, t: paddle.Tensor, rank: int, layout: str) -> None:
    if len(t.shape) != rank:
        raise ValueError(f"{op}: '{arg}' must have shape {layout}, got {_shape(t)}")


def _check_dtype(op: str, arg: str, t: paddle.Tensor, dtype) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{op}: '{arg}' must be {dtype}, got {t.dtype}")


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
    x: paddle.Tensor,
    logits: paddle.Tensor,
    *,
    top_k: int,
    capacity_factor: float,
    normalize: bool,
    noise: paddle.Tensor | None = None,
    backend: str | None = None,
) -> GateDispatchResult:
    """Fused softmax + top-k + (random routing) + capacity + positions + row permutation.

    Args:
        x: [T, D] token rows (float32 on CPU; also float16/bfloat16 on GPU).
        logits: [T, E] float32 router logits.
        top_k: experts per token, 1 <= K <= E.
        capacity_factor: capacity = ceil(cf * T * K / E) rows per expert (cf to 1e-6, exact
            integer arithmetic); <= 0 is dropless.
        normalize: divide the K selected probabilities by their sum.
        noise: optional [T] float32 uniform draws enabling GShard random routing of the
            experts after the first.
    """
    op = "gate_dispatch"
    _check_rank(op, "x", x, 2, "[T, D]")
    _check_rows_dtype(op, "x", x)
    _check_rank(op, "logits", logits, 2, "[T, E]")
    _check_dtype(op, "logits", logits, paddle.float32)
    T, E = _shape(logits)
    if not _same_dim(T, _shape(x)[0]):
        raise ValueError(f"{op}: logits {_shape(logits)} and x {_shape(x)} disagree on tokens T")
    if not 1 <= top_k <= E:
        raise ValueError(f"{op}: top_k must be in [1, num_experts={E}], got {top_k}")
    if noise is not None:
        _check_dtype(op, "noise", noise, paddle.float32)
        if T is not None and noise.size != T:
            raise ValueError(f"{op}: 'noise' must have T={T} elements, got shape {_shape(noise)}")
        noise = noise.reshape([-1])
    lib = resolve_backend(backend)
    if lib is None:
        return _without_int_grads(
            GateDispatchResult(*reference.gate_dispatch(x, logits, noise, top_k, capacity_factor, normalize))
        )
    if noise is None:
        noise = paddle.zeros([0], dtype="float32")
    out = lib.semoe_gate_dispatch(
        x, logits, noise, int(top_k), capacity_factor_micro(capacity_factor), bool(normalize)
    )
    return _without_int_grads(GateDispatchResult(*out))


def _without_int_grads(r: GateDispatchResult) -> GateDispatchResult:
    """Integer outputs carry no gradient; marking them keeps Paddle's autograd from expecting one
    (an int tensor that looks differentiable cuts the graph where another custom op consumes it)."""
    for t in (r.ids, r.positions, r.counts):
        t.stop_gradient = True
    return r


@paddle.jit.not_to_static  # plain Python while tracing: no control-flow rewriting
def combine(
    rows: paddle.Tensor,
    weights: paddle.Tensor,
    positions: paddle.Tensor,
    *,
    backend: str | None = None,
) -> paddle.Tensor:
    """Weighted un-permute: out[t] = sum_j weights[t,j] * rows[positions[t,j]] (pos >= 0).

    rows [R, D], weights [T, K] float32, positions [T, K] int32 (unique, or -1) -> [T, D].
    """
    op = "combine"
    _check_rank(op, "rows", rows, 2, "[R, D]")
    _check_rows_dtype(op, "rows", rows)
    _check_rank(op, "weights", weights, 2, "[T, K]")
    _check_dtype(op, "weights", weights, paddle.float32)
    _check_rank(op, "positions", positions, 2, "[T, K]")
    _check_dtype(op, "positions", positions, paddle.int32)
    ws, ps = _shape(weights), _shape(positions)
    if not all(_same_dim(a, b) for a, b in zip(ws, ps)):
        raise ValueError(f"{op}: weights {_shape(weights)} and positions {_shape(positions)} differ")
    lib = resolve_backend(backend)
    if lib is None:
        return reference.combine(rows, weights, positions)
    return lib.semoe_combine(rows, weights, positions)


@paddle.jit.not_to_static  # plain Python while tracing: no control-flow rewriting
def grouped_ffn(
    x: paddle.Tensor,
    counts: paddle.Tensor,
    w1: paddle.Tensor,
    b1: paddle.Tensor,
    w2: paddle.Tensor,
    b2: paddle.Tensor,
    *,
    activation: str = "gelu",
    backend: str | None = None,
) -> paddle.Tensor:
    """Expert FFN over expert-major rows: rows of expert e -> act(x W1[e] + b1[e]) W2[e] + b2[e].

    x [R, D]; counts int32 [E] (expert e owns the next counts[e] rows; rows past the sum
    give zeros); w1 [E, D, F]; b1 [E, F]; w2 [E, F, D]; b2 [E, D] -> [R, D].
    """
    op = "grouped_ffn"
    _check_rank(op, "x", x, 2, "[R, D]")
    _check_rows_dtype(op, "x", x)
    _check_dtype(op, "counts", counts, paddle.int32)
    _check_rank(op, "counts", counts, 1, "[E]")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    E = _shape(counts)[0]
    D = _shape(x)[1]
    w1s = _shape(w1)
    if len(w1s) != 3 or not _same_dim(w1s[0], E) or not _same_dim(w1s[1], D):
        raise ValueError(f"{op}: 'w1' must have shape [E={E}, D={D}, F], got {w1s}")
    F_ = w1s[2]
    for arg, t, want in (("b1", b1, [E, F_]), ("w2", w2, [E, F_, D]), ("b2", b2, [E, D])):
        got = _shape(t)
        if len(got) != len(want) or not all(_same_dim(g, w) for g, w in zip(got, want)):
            raise ValueError(f"{op}: '{arg}' must have shape {want}, got {got}")
    lib = resolve_backend(backend)
    if lib is None:
        return reference.grouped_ffn(x, counts, w1, b1, w2, b2, activation)
    out, _hidden = lib.semoe_grouped_ffn(x, counts, w1, b1, w2, b2, activation)
    return out
