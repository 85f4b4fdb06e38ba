"""Pure-Paddle reference implementations of the custom ops.

Same contract as the compiled ops (``custom_ops/README.md``): same outputs, same positions,
same tie-breaking, gradients through Paddle's autograd. Used as the fallback when the
compiled ops are unavailable and as the oracle in tests. Slow but obviously correct.
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


CAPACITY_SCALE = 1_000_000


def capacity_factor_micro(capacity_factor: float) -> int:
    """The capacity factor in millionths, as the ops take it (<= 0: dropless)."""
    return int(round(capacity_factor * CAPACITY_SCALE)) if capacity_factor > 0 else 0


def expert_capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * T * K / E) in exact integer arithmetic (cf to 1e-6); 0 = dropless."""
    micro = capacity_factor_micro(capacity_factor)
    if micro <= 0 or tokens <= 0:
        return 0
    den = num_experts * CAPACITY_SCALE
    return (micro * tokens * top_k + den - 1) // den


def dispatch_rows(tokens: int, num_experts: int, top_k: int, capacity: int) -> int:
    """Rows of the dispatch buffer: T*K without capacity, else min(T*K, E*capacity)."""
    if capacity <= 0:
        return tokens * top_k
    return min(tokens * top_k, num_experts * capacity)


def expert_count(ids: paddle.Tensor, num_experts: int) -> paddle.Tensor:
    """counts[e] = number of entries of ``ids`` equal to e (others ignored). int32 [E]."""
    flat = ids.reshape([-1]).astype("int64")
    if flat.shape[0] == 0:
        return paddle.zeros([num_experts], dtype="int32")
    hits = flat.unsqueeze(1) == paddle.arange(num_experts, dtype="int64").unsqueeze(0)
    return hits.astype("int32").sum(axis=0).astype("int32")


def activation(h: paddle.Tensor, name: str) -> paddle.Tensor:
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate=True)
    if name == "relu":
        return F.relu(h)
    if name == "silu":
        return F.silu(h)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def gate_dispatch(
    x: paddle.Tensor,
    logits: paddle.Tensor,
    noise: paddle.Tensor | None,
    top_k: int,
    capacity_factor: float,
    normalize: bool,
):
    """Reference fused gate-dispatch.

    Args:
        x: [T, D] token rows. logits: [T, E] float32 router logits.
        noise: [T] float32 uniform draws for GShard random routing, or None.
    Returns:
        (rows [R, D], weights [T, K] f32, ids [T, K] i32, pos [T, K] i32, counts [E] i32,
        probs [T, E] f32) with R = dispatch_rows(T, E, K, capacity).
    """
    T, D = x.shape
    E = logits.shape[1]
    K = top_k
    cap = expert_capacity(T, E, K, capacity_factor)
    n_rows = dispatch_rows(T, E, K, cap)
    probs = F.softmax(logits.astype("float32"), axis=-1)
    if T == 0:
        empty_i = paddle.zeros([0, K], dtype="int32")
        return (
            paddle.zeros([0, D], dtype=x.dtype),
            paddle.zeros([0, K], dtype="float32"),
            empty_i,
            empty_i,
            paddle.zeros([E], dtype="int32"),
            probs,
        )
    order = paddle.argsort(-probs, axis=-1, stable=True)[:, :K]  # ties: lower index first
    top_p = paddle.take_along_axis(probs, order, axis=1)
    weights = top_p / top_p.sum(axis=-1, keepdim=True) if normalize else top_p
    keep = paddle.ones([T, K], dtype="bool")
    if noise is not None and K >= 2:
        p0 = top_p[:, :1]
        accept = noise.reshape([T, 1]) < 2.0 * top_p[:, 1:] / (p0 + top_p[:, 1:])
        keep = paddle.concat([keep[:, :1], accept], axis=1)

    flat_ids = order.reshape([-1])
    flat_keep = keep.reshape([-1]).astype("int64")
    onehot = F.one_hot(flat_ids, E).astype("int64") * flat_keep.unsqueeze(1)  # [T*K, E]
    rank = ((paddle.cumsum(onehot, axis=0) - onehot) * onehot).sum(axis=1)  # rank in expert
    demand = onehot.sum(axis=0)
    if cap > 0:
        kept = (flat_keep > 0) & (rank < cap)
        counts = paddle.minimum(demand, paddle.full_like(demand, cap))
    else:
        kept = flat_keep > 0
        counts = demand
    offsets = paddle.cumsum(counts) - counts
    pos = paddle.where(kept, paddle.gather(offsets, flat_ids) + rank, paddle.full_like(rank, -1))

    n_kept = int(counts.sum())
    token_of = paddle.arange(T * K, dtype="int64") // K
    src_token = paddle.zeros([n_kept], dtype="int64")
    if n_kept > 0:
        kept_idx = paddle.nonzero(kept).reshape([-1])
        src_token = paddle.scatter(
            src_token, paddle.gather(pos, kept_idx), paddle.gather(token_of, kept_idx)
        )
    rows = paddle.gather(x, src_token) if n_kept > 0 else paddle.zeros([0, D], dtype=x.dtype)
    if n_rows > n_kept:
        rows = paddle.concat([rows, paddle.zeros([n_rows - n_kept, D], dtype=x.dtype)], axis=0)
    return (
        rows,
        weights,
        order.astype("int32"),
        pos.reshape([T, K]).astype("int32"),
        counts.astype("int32"),
        probs,
    )


def combine(rows: paddle.Tensor, weights: paddle.Tensor, pos: paddle.Tensor) -> paddle.Tensor:
    """out[t] = sum_j weights[t, j] * rows[pos[t, j]] over pos >= 0. [T, D]."""
    T, K = pos.shape
    D = rows.shape[1]
    if T == 0:
        return paddle.zeros([0, D], dtype=rows.dtype)
    valid = pos >= 0
    idx = paddle.where(valid, pos, paddle.zeros_like(pos)).reshape([-1]).astype("int64")
    if rows.shape[0] == 0:
        return paddle.zeros([T, D], dtype=rows.dtype)
    picked = paddle.gather(rows, idx).reshape([T, K, D])
    w = (weights * valid.astype(weights.dtype)).astype(rows.dtype)
    return (picked * w.unsqueeze(-1)).sum(axis=1)


def grouped_ffn(
    x: paddle.Tensor,
    counts: paddle.Tensor,
    w1: paddle.Tensor,
    b1: paddle.Tensor,
    w2: paddle.Tensor,
    b2: paddle.Tensor,
    activation_name: str,
) -> paddle.Tensor:
    """Sequential reference of the expert FFN: one matmul pair per expert. [R, D]."""
    R, D = x.shape
    c = [int(v) for v in counts.numpy().tolist()]
    outs = []
    off = 0
    for e, n in enumerate(c):
        if n == 0:
            continue
        xe = x[off : off + n]
        h = paddle.matmul(xe, w1[e]) + b1[e]
        outs.append(paddle.matmul(activation(h, activation_name), w2[e]) + b2[e])
        off += n
    if off < R:
        outs.append(paddle.zeros([R - off, D], dtype=x.dtype))
    if not outs:
        return paddle.zeros([0, D], dtype=x.dtype)
    return paddle.concat(outs, axis=0) if len(outs) > 1 else outs[0]
