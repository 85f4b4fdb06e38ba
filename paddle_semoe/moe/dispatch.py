"""Dispatch tokens to experts through the fused op.

``dispatch`` turns tokens and router logits into expert-major rows plus the routing record
(:class:`Dispatch`) that ``MoELayer.combine`` consumes; no positional tuples cross this boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle

from paddle_semoe import ops


@dataclass(frozen=True)
class Dispatch:
    """The routing of one batch of tokens.

    Attributes:
        rows: [R, D] token rows, expert-major: expert e owns rows [off_e, off_e + counts[e]),
            off = exclusive prefix sum of counts; rows past sum(counts) are zero padding.
        counts: [E] int32 rows kept per expert.
        positions: [T, K] int32 row of each (token, choice) in ``rows``, -1 when dropped.
        weights: [T, K] float32 combine weights (normalized probabilities if configured).
        expert_ids: [T, K] int32 experts chosen by the gate (including dropped choices).
        probs: [T, E] float32 router probabilities (for the load-balance loss).
    """

    rows: paddle.Tensor
    counts: paddle.Tensor
    positions: paddle.Tensor
    weights: paddle.Tensor
    expert_ids: paddle.Tensor
    probs: paddle.Tensor


def dispatch(
    x_TD: paddle.Tensor,
    logits_TE: paddle.Tensor,
    *,
    top_k: int,
    capacity_factor: float,
    normalize: bool,
    noise_T: paddle.Tensor | None = None,
    capacity_rule: str = "choice",
    batch_priority: bool = False,
    min_capacity: int = 0,
    select_bias: paddle.Tensor | None = None,
    score_fn: str = "softmax",
    backend: str | None = None,
) -> Dispatch:
    """Softmax, top-k, capacity (``capacity_factor <= 0``: dropless) and permutation.

    ``capacity_rule`` (``choice`` | ``token`` | ``probs``), ``batch_priority`` and
    ``min_capacity`` decide which assignments an overflowing expert keeps; ``select_bias``
    ([E] or [T, E]) shifts the top-k selection only; ``score_fn`` is softmax or sigmoid. See
    :func:`paddle_semoe.ops.gate_dispatch` (``MoEConfig.capacity_rule`` gives the rule).
    """
    r = ops.gate_dispatch(
        x_TD,
        logits_TE,
        top_k=top_k,
        capacity_factor=capacity_factor,
        normalize=normalize,
        noise=noise_T,
        capacity_rule=capacity_rule,
        batch_priority=batch_priority,
        min_capacity=min_capacity,
        select_bias=select_bias,
        score_fn=score_fn,
        backend=backend,
    )
    return Dispatch(r.rows, r.counts, r.positions, r.weights, expert_ids=r.ids, probs=r.probs)

