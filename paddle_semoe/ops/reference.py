"""Pure-Paddle reference implementations of the custom ops.

Same contract as the compiled ops (``custom_ops/README.md``): same outputs, same positions,
same tie-breaking, gradients through Paddle's autograd. Used as the fallback when the
compiled ops are unavailable and as the oracle in tests. Slow but obviously correct.
"""

from __future__ import annotations

import functools
from typing import Callable

import paddle
import paddle.nn.functional as F

_ACTIVATION_FNS: dict[str, Callable[..., paddle.Tensor]] = {
    "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate=True),
    "relu": F.relu, "silu": F.silu,
}
ACTIVATIONS = tuple(_ACTIVATION_FNS)

CAPACITY_SCALE = 1_000_000

# Capacity priority rules; the index is the op attribute ``capacity_rule``
# (custom_ops/include/semoe/routing_rules.h):
#   choice: every token's j-th choice before any token's (j+1)-th; within one choice, token order
#   token:  (token, choice) order, the rule before choice-major (baseline only)
#   probs:  each expert keeps its highest-probability assignments, ties by token index
CAPACITY_RULES = ("choice", "token", "probs")
# Router score functions; the index is the op attribute ``score_fn``.
SCORE_FNS = ("softmax", "sigmoid")


def capacity_factor_micro(capacity_factor: float) -> int:
    """The capacity factor in millionths, as the ops take it (<= 0: dropless)."""
    return int(round(capacity_factor * CAPACITY_SCALE)) if capacity_factor > 0 else 0


def expert_capacity(
    tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int = 0
) -> int:
    """max(ceil(capacity_factor * T * K / E), min_capacity) in exact integer arithmetic (cf to
    1e-6); 0 = dropless (capacity_factor <= 0 or T == 0; min_capacity does not apply)."""
    micro = capacity_factor_micro(capacity_factor)
    if micro <= 0 or tokens <= 0:
        return 0
    den = num_experts * CAPACITY_SCALE
    return max((micro * tokens * top_k + den - 1) // den, int(min_capacity))


def capacity_rule_code(rule: str, batch_priority: bool) -> int:
    """The op attribute for a capacity rule name; refuses unknown names and probs + BPR."""
    if rule not in CAPACITY_RULES:
        raise ValueError(f"capacity rule must be one of {CAPACITY_RULES}, got {rule!r}")
    if batch_priority and rule == "probs":
        raise ValueError("batch_priority orders tokens for the position rules; it cannot be combined with 'probs'")
    return CAPACITY_RULES.index(rule)


def capacity_visit_order(
    probs_TE: paddle.Tensor, ids_TK: paddle.Tensor, rule: str, batch_priority: bool
) -> paddle.Tensor:
    """int64 [T*K]: the assignment index a = t*K + j visited v-th under the capacity rule.

    choice: (j, tok) ascending; token: (tok, j) ascending, where tok is t, or with
    ``batch_priority`` the token's rank by top probability (descending, ties by t);
    probs: probs[t, ids[t, j]] descending, ties by a. Every sort is stable.
    """
    T, K = ids_TK.shape
    if rule == "probs":
        sel = paddle.take_along_axis(probs_TE, ids_TK.astype("int64"), axis=1).reshape([-1])
        return paddle.argsort(-sel, stable=True)
    tok = paddle.arange(T, dtype="int64")
    if batch_priority:
        top = paddle.take_along_axis(probs_TE, ids_TK[:, :1].astype("int64"), axis=1).reshape([-1])
        tok = paddle.argsort(-top, stable=True)
    a = tok.unsqueeze(1) * K + paddle.arange(K, dtype="int64").unsqueeze(0)  # [T, K] in token order
    return (a.t() if rule == "choice" else a).reshape([-1])


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
    if name not in _ACTIVATION_FNS:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return _ACTIVATION_FNS[name](h)


def gate_dispatch(
    x: paddle.Tensor, logits: paddle.Tensor, noise: paddle.Tensor | None, top_k: int,
    capacity_factor: float, normalize: bool, capacity_rule: str = "choice",
    batch_priority: bool = False, min_capacity: int = 0, select_bias: paddle.Tensor | None = None,
    score_fn: str = "softmax",
):
    """Reference fused gate-dispatch: the arguments of :func:`paddle_semoe.ops.gate_dispatch`
    (``noise``: [T] or None); the capacity rule orders assignments by ``capacity_visit_order``.

    Returns:
        (rows [R, D], weights [T, K] f32, ids [T, K] i32, pos [T, K] i32, counts [E] i32,
        probs [T, E] f32) with R = dispatch_rows(T, E, K, capacity).
    """
    T, D = x.shape
    E = logits.shape[1]
    K = top_k
    capacity_rule_code(capacity_rule, batch_priority)
    cap = expert_capacity(T, E, K, capacity_factor, min_capacity)
    n_rows = dispatch_rows(T, E, K, cap)
    if score_fn not in SCORE_FNS:
        raise ValueError(f"score_fn must be one of {SCORE_FNS}, got {score_fn!r}")
    z = logits.astype("float32")
    probs = F.sigmoid(z) if score_fn == "sigmoid" else F.softmax(z, axis=-1)
    if T == 0:
        empty_i = paddle.zeros([0, K], dtype="int32")
        return (paddle.zeros([0, D], dtype=x.dtype), paddle.zeros([0, K], dtype="float32"), empty_i,
                empty_i, paddle.zeros([E], dtype="int32"), probs)
    key = probs.detach() if select_bias is None else probs.detach() + select_bias.astype("float32")
    order = paddle.argsort(-key, axis=-1, stable=True)[:, :K]  # ties: lower index first
    top_p = paddle.take_along_axis(probs, order, axis=1)
    weights = top_p / top_p.sum(axis=-1, keepdim=True) if normalize else top_p
    keep = paddle.ones([T, K], dtype="bool")
    if noise is not None and K >= 2:
        p0 = top_p[:, :1]
        accept = noise.reshape([T, 1]) < 2.0 * top_p[:, 1:] / (p0 + top_p[:, 1:])
        keep = paddle.concat([keep[:, :1], accept], axis=1)

    flat_ids = order.reshape([-1])
    flat_keep = keep.reshape([-1]).astype("int64")
    visit = capacity_visit_order(probs, order, capacity_rule, batch_priority)  # [T*K]
    v_ids = paddle.gather(flat_ids, visit)
    onehot = F.one_hot(v_ids, E).astype("int64") * paddle.gather(flat_keep, visit).unsqueeze(1)
    v_rank = ((paddle.cumsum(onehot, axis=0) - onehot) * onehot).sum(axis=1)  # rank in expert
    rank = paddle.scatter(paddle.zeros_like(v_rank), visit, v_rank)  # back to a = t*K + j
    counts = onehot.sum(axis=0)  # demand per expert
    kept = flat_keep > 0
    if cap > 0:
        kept = kept & (rank < cap)
        counts = paddle.minimum(counts, paddle.full_like(counts, cap))
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
    ids, pos = order.astype("int32"), pos.reshape([T, K]).astype("int32")
    return rows, weights, ids, pos, counts.astype("int32"), probs


def combine(rows: paddle.Tensor, weights: paddle.Tensor, pos: paddle.Tensor) -> paddle.Tensor:
    """out[t] = sum_j weights[t, j] * rows[pos[t, j]] over pos >= 0. [T, D]."""
    T, K = pos.shape
    D = rows.shape[1]
    if T == 0:
        return paddle.zeros([0, D], dtype=rows.dtype)
    if rows.shape[0] == 0:
        return paddle.zeros([T, D], dtype=rows.dtype)
    valid = pos >= 0
    idx = paddle.where(valid, pos, paddle.zeros_like(pos)).reshape([-1]).astype("int64")
    picked = paddle.gather(rows, idx).reshape([T, K, D])
    w = (weights * valid.astype(weights.dtype)).astype(rows.dtype)
    return (picked * w.unsqueeze(-1)).sum(axis=1)


def grouped_ffn(
    x: paddle.Tensor, counts: paddle.Tensor, w1: paddle.Tensor, b1: paddle.Tensor,
    w2: paddle.Tensor, b2: paddle.Tensor, activation_name: str,
) -> paddle.Tensor:
    """Sequential reference of the expert FFN: one matmul pair per expert. [R, D]."""
    R, D = x.shape
    outs, off = [], 0
    for e, n in enumerate(int(v) for v in counts.numpy().tolist()):
        if n > 0:
            h = paddle.matmul(x[off : off + n], w1[e]) + b1[e]
            outs.append(paddle.matmul(activation(h, activation_name), w2[e]) + b2[e])
            off += n
    if off < R or not outs:
        outs.append(paddle.zeros([R - off, D], dtype=x.dtype))
    return paddle.concat(outs, axis=0) if len(outs) > 1 else outs[0]


# ----------------------------------------------------------------------------- dense-model ops
def linear(x: paddle.Tensor, w: paddle.Tensor, b: paddle.Tensor | None, activation_name: str, trans_w: bool) -> paddle.Tensor:
    """act(x @ W + b): x [..., K]; W [K, N] (or [N, K] with trans_w); b [N], [0] or None. [..., N]."""
    y = paddle.matmul(x, w, transpose_y=trans_w)
    if b is not None and b.shape[0] != 0:
        y = y + b
    return y if activation_name == "none" else activation(y, activation_name)


def layernorm(x: paddle.Tensor, gamma: paddle.Tensor, beta: paddle.Tensor, epsilon: float) -> paddle.Tensor:
    """LayerNorm over the last dim (biased variance). Same shape as x."""
    return F.layer_norm(x, [x.shape[-1]], gamma, beta, epsilon)


def add_layernorm(
    x: paddle.Tensor, residual: paddle.Tensor, gamma: paddle.Tensor, beta: paddle.Tensor, epsilon: float
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """(layernorm(x + residual), x + residual)."""
    s = x + residual
    return layernorm(s, gamma, beta, epsilon), s


def softmax_cross_entropy(logits: paddle.Tensor, labels: paddle.Tensor, ignore_index: int) -> paddle.Tensor:
    """Mean token cross-entropy over rows whose label != ignore_index (0 when none). Scalar.

    logits [T, V] float32, labels [T] int64.
    """
    per_row = F.cross_entropy(logits, labels.reshape([-1, 1]), ignore_index=ignore_index, reduction="none").reshape([-1])
    counted = (labels.reshape([-1]) != ignore_index).astype(logits.dtype)
    return (per_row * counted).sum() / paddle.clip(counted.sum(), min=1.0)


def causal_attention(qkv: paddle.Tensor, k_past: paddle.Tensor, v_past: paddle.Tensor, num_heads: int) -> paddle.Tensor:
    """Causal self-attention over [past keys, new keys]. qkv [B, S, 3*H*Dh] (last dim laid out
    [3, H, Dh]); k_past, v_past [B, H, P, Dh]; query i (position P + i) sees keys 0..P+i.
    Returns [B, S, H*Dh] (heads merged)."""
    B, S, D3 = qkv.shape
    D = D3 // 3
    Dh = D // num_heads
    q, k, v = qkv.reshape([B, S, 3, num_heads, Dh]).transpose([2, 0, 3, 1, 4]).unbind(0)
    k = paddle.concat([k_past, k], axis=2)
    v = paddle.concat([v_past, v], axis=2)
    L = k.shape[2]
    scores = paddle.matmul(q, k, transpose_y=True) * (1.0 / Dh**0.5)
    q_pos = paddle.arange(L - S, L, dtype="int64").unsqueeze(1)
    k_pos = paddle.arange(L, dtype="int64").unsqueeze(0)
    scores = paddle.where(k_pos <= q_pos, scores, paddle.full_like(scores, float("-inf")))
    return paddle.matmul(F.softmax(scores, axis=-1), v).transpose([0, 2, 1, 3]).reshape([B, S, D])


def adamw_step(
    params: list[paddle.Tensor], grads: list[paddle.Tensor], moment1: list[paddle.Tensor],
    moment2: list[paddle.Tensor], beta1_pow: list[paddle.Tensor], beta2_pow: list[paddle.Tensor], *,
    lr: float, beta1: float, beta2: float, epsilon: float, weight_decay: float,
    decay_mask: list[bool], grad_scale: float,
) -> None:
    """AdamW as Paddle's kernel computes it, one tensor at a time, in place (see
    custom_ops/include/semoe/adamw_cpu.h for the formula)."""
    with paddle.no_grad():
        for p, g, m1, m2, b1p, b2p, decay in zip(params, grads, moment1, moment2, beta1_pow, beta2_pow, decay_mask):
            g = g * grad_scale
            b1, b2 = float(b1p.reshape([-1])[0]), float(b2p.reshape([-1])[0])
            lr_t = lr * (1.0 - b2) ** 0.5 / (1.0 - b1)
            eps_t = epsilon * (1.0 - b2) ** 0.5
            p_tmp = p - (lr * weight_decay if decay else 0.0) * p
            new_m1 = beta1 * m1 + (1.0 - beta1) * g
            new_m2 = beta2 * m2 + (1.0 - beta2) * g * g
            paddle.assign(new_m1, output=m1)
            paddle.assign(new_m2, output=m2)
            paddle.assign(p_tmp - lr_t * (new_m1 / (paddle.sqrt(new_m2) + eps_t)), output=p)
            paddle.assign(b1p * beta1, output=b1p)
            paddle.assign(b2p * beta2, output=b2p)


def squared_norms(tensors: list[paddle.Tensor]) -> paddle.Tensor:
    """float32 [n]: the sum of squares of each tensor."""
    if not tensors:
        return paddle.zeros([0], dtype="float32")
    return paddle.stack([paddle.sum(paddle.square(t.astype("float32"))) for t in tensors])
