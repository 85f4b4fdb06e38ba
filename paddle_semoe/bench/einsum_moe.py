"""The dense one-hot "einsum" MoE dispatch of GShard and DeepSpeed-MoE, written in Paddle.

A baseline for benchmarks: same routing contract as :class:`paddle_semoe.moe.MoELayer`
(softmax, top-k with ties to the lower index, capacity in token order, normalized weights),
but tokens move through dense [T, E, C] dispatch/combine tensors and einsums, and experts
run as a batched matmul over the padded [E, C, D] buffer.
"""

from __future__ import annotations

import paddle
import paddle.nn.functional as F

from paddle_semoe.moe import MoELayer
from paddle_semoe.ops import expert_capacity, reference


def einsum_moe_forward(layer: MoELayer, x_TD: paddle.Tensor) -> paddle.Tensor:
    """y[T, D] for ``layer``'s weights through one-hot einsum dispatch (no aux losses)."""
    cfg = layer.config
    T, D = x_TD.shape
    E, K = cfg.num_experts, cfg.k
    cap = expert_capacity(T, E, K, cfg.capacity_factor_for(layer.training))
    C = cap if cap > 0 else T * K
    logits = paddle.matmul(x_TD.astype("float32"), layer.router.weight)
    probs = F.softmax(logits, axis=-1)
    order = paddle.argsort(-probs, axis=-1, stable=True)[:, :K]
    top_p = paddle.take_along_axis(probs, order, axis=1)
    weights = top_p / top_p.sum(axis=-1, keepdim=True) if cfg.normalize else top_p

    onehot = F.one_hot(order.reshape([-1]), E)  # [T*K, E] token-major visit order
    rank = (paddle.cumsum(onehot, axis=0) - onehot) * onehot  # rank of each choice in its expert
    keep = (rank < C).astype("float32") * onehot  # [T*K, E]
    slot = F.one_hot(rank.sum(axis=1).astype("int64").clip(0, C - 1), C)  # [T*K, C]
    dispatch_TKEC = keep.unsqueeze(-1) * slot.unsqueeze(1)  # [T*K, E, C]
    dispatch_TEC = dispatch_TKEC.reshape([T, K, E, C]).sum(axis=1)
    combine_TEC = (dispatch_TKEC.reshape([T, K, E, C]) * weights.reshape([T, K, 1, 1])).sum(axis=1)

    ex = layer.experts
    if ex.w1 is None or ex.b1 is None or ex.w2 is None or ex.b2 is None:
        raise ValueError("einsum_moe_forward needs resident expert weights; the layer was built with deferred ones")
    x_ECD = paddle.einsum("tec,td->ecd", dispatch_TEC.astype(x_TD.dtype), x_TD)
    h = paddle.bmm(x_ECD, ex.w1) + ex.b1.unsqueeze(1)
    y_ECD = paddle.bmm(reference.activation(h, ex.activation), ex.w2) + ex.b2.unsqueeze(1)
    return paddle.einsum("tec,ecd->td", combine_TEC.astype(x_TD.dtype), y_ECD)
