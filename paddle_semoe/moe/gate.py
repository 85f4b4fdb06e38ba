"""The router: token -> expert logits, with the gate kind's training-time noise.

The router only computes logits (and the random draws its gate kind needs); the softmax,
top-k and capacity are fused into the dispatch op. It never communicates.
"""

from __future__ import annotations

from typing import NamedTuple

import paddle
import paddle.nn as nn

from paddle_semoe.moe.config import MoEConfig
from paddle_semoe.moe.params import mark_params


class RouterOutput(NamedTuple):
    logits: paddle.Tensor  # [T, E] float32
    noise: paddle.Tensor | None  # [T] float32 uniform draws for GShard random routing


class Router(nn.Layer):
    """Linear router ``logits = x @ W`` in float32; ``W`` is [D, E] and tagged as a gate param.

    Gate kinds (``MoEConfig.gate``), applied only while training:
      * ``switch``: multiplicative jitter of the router input, x * U(1 - eps, 1 + eps);
      * ``gshard``: draws ``noise ~ U(0, 1)`` per token for random routing of the 2nd expert.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = self.create_parameter(
            [config.d_model, config.num_experts],
            dtype="float32",
            default_initializer=nn.initializer.Normal(std=config.init_std),
        )
        mark_params([self.weight], "gate")

    def forward(self, x_TD: paddle.Tensor) -> RouterOutput:
        cfg = self.config
        h = x_TD.astype("float32")
        if self.training and cfg.gate == "switch" and cfg.jitter_eps > 0:
            h = h * paddle.uniform(h.shape, dtype="float32", min=1.0 - cfg.jitter_eps, max=1.0 + cfg.jitter_eps)
        with paddle.amp.auto_cast(enable=False):  # routing stays in float32 under AMP
            logits = paddle.matmul(h, self.weight.astype("float32"))
        noise = None
        if self.training and cfg.gate == "gshard":
            noise = paddle.uniform([x_TD.shape[0]], dtype="float32", min=0.0, max=1.0)
        return RouterOutput(logits, noise)
