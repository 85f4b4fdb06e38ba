"""Auxiliary router losses, returned explicitly (never stored in globals)."""

from __future__ import annotations

import paddle


def load_balance_loss(probs_TE: paddle.Tensor, counts_E: paddle.Tensor, top_k: int) -> paddle.Tensor:
    """GShard/Switch load-balance loss ``E * sum_e f_e * P_e``.

    f_e = counts_E[e] / (T * K): the share of ALL T*K routing choices (every token's first
    through K-th choice, counted before capacity, so dropped choices count too, and choices
    removed by GShard random routing count as well) that picked expert e; no gradient.
    ``counts_E`` is int [E] (``expert_count`` of the top-k ids). P_e: mean router probability
    of expert e over the T tokens (carries the gradient). Equals 1 for perfectly uniform
    routing (f_e = P_e = 1/E). Scalar f32.
    """
    T, E = probs_TE.shape
    if T == 0:
        return paddle.zeros([], dtype="float32")
    f = counts_E.astype("float32") / float(T * top_k)
    P = probs_TE.mean(axis=0)
    return float(E) * (f.detach() * P).sum()


def router_z_loss(logits_TE: paddle.Tensor) -> paddle.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2. Scalar f32."""
    if logits_TE.shape[0] == 0:
        return paddle.zeros([], dtype="float32")
    z = paddle.logsumexp(logits_TE.astype("float32"), axis=-1)
    return (z * z).mean()
