"""Shared experts (DeepSeekMoE): always-on FFNs computed for every token beside the routed ones.

``num_shared_experts`` experts of hidden width ``F_s`` summed over the same input equal one FFN
of width ``num_shared_experts * F_s``; that one FFN runs through the fused grouped-FFN op as a
single group holding every token. Its parameters are ``dense`` (replicated on every rank and
averaged over all of them), never expert-parallel.
"""

from __future__ import annotations

import paddle
import paddle.nn as nn

from paddle_semoe import ops
from paddle_semoe.params import mark_params


class SharedExperts(nn.Layer):
    """``y = act(x W1 + b1) W2 + b2`` over all tokens; W1 [D, F], b1 [F], W2 [F, D], b2 [D]
    with ``F = num_shared * d_ff``."""

    def __init__(
        self, num_shared: int, d_model: int, d_ff: int, *, activation: str = "gelu", init_std: float = 0.02,
        backend: str | None = None,
    ):
        super().__init__()
        if num_shared <= 0 or d_model <= 0 or d_ff <= 0:
            raise ValueError(f"SharedExperts needs positive sizes, got num_shared={num_shared} d_model={d_model} d_ff={d_ff}")
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"activation must be one of {ops.ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.backend = backend
        width = num_shared * d_ff
        normal = nn.initializer.Normal(std=init_std)
        zeros = nn.initializer.Constant(0.0)
        self.w1 = self.create_parameter([d_model, width], default_initializer=normal)
        self.b1 = self.create_parameter([width], default_initializer=zeros)
        self.w2 = self.create_parameter([width, d_model], default_initializer=normal)
        self.b2 = self.create_parameter([d_model], default_initializer=zeros)
        mark_params([self.w1, self.b1, self.w2, self.b2], "dense")

    def forward(self, x_TD: paddle.Tensor) -> paddle.Tensor:
        """x [T, D] -> [T, D]."""
        counts = paddle.full([1], x_TD.shape[0], dtype="int32")
        return ops.grouped_ffn(
            x_TD, counts, self.w1.unsqueeze(0), self.b1.unsqueeze(0), self.w2.unsqueeze(0), self.b2.unsqueeze(0),
            activation=self.activation, backend=self.backend,
        )
