"""The experts: E two-layer FFNs evaluated as one grouped op over expert-major rows."""

from __future__ import annotations

import paddle
import paddle.nn as nn

from paddle_semoe import ops
from paddle_semoe.moe.params import mark_params
from paddle_semoe.ops import reference


class GroupedExperts(nn.Layer):
    """``num_experts`` FFNs ``act(x W1[e] + b1[e]) W2[e] + b2[e]`` stored as stacked weights.

    Parameters (all tagged ``expert``): w1 [E, D, F], b1 [E, F], w2 [E, F, D], b2 [E, D].
    ``forward`` runs the fused grouped op (no Python loop over experts);
    ``forward_sequential`` is the per-expert reference used by tests.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "gelu",
        init_std: float = 0.02,
        backend: str | None = None,
    ):
        super().__init__()
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"activation must be one of {ops.ACTIVATIONS}, got {activation!r}")
        self.num_experts = num_experts
        self.activation = activation
        self.backend = backend
        normal = nn.initializer.Normal(std=init_std)
        zeros = nn.initializer.Constant(0.0)
        self.w1 = self.create_parameter([num_experts, d_model, d_ff], default_initializer=normal)
        self.b1 = self.create_parameter([num_experts, d_ff], default_initializer=zeros)
        self.w2 = self.create_parameter([num_experts, d_ff, d_model], default_initializer=normal)
        self.b2 = self.create_parameter([num_experts, d_model], default_initializer=zeros)
        mark_params([self.w1, self.b1, self.w2, self.b2], "expert")

    def forward(self, rows_RD: paddle.Tensor, counts_E: paddle.Tensor) -> paddle.Tensor:
        """rows [R, D] expert-major, counts int32 [E] -> [R, D] (zeros past sum(counts))."""
        return ops.grouped_ffn(
            rows_RD, counts_E, self.w1, self.b1, self.w2, self.b2,
            activation=self.activation, backend=self.backend,
        )

    def forward_sequential(self, rows_RD: paddle.Tensor, counts_E: paddle.Tensor) -> paddle.Tensor:
        """Reference: a plain loop of per-expert matmuls."""
        return reference.grouped_ffn(
            rows_RD, counts_E, self.w1, self.b1, self.w2, self.b2, self.activation
        )
