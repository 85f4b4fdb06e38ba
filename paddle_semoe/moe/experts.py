"""The experts: E two-layer FFNs evaluated as one grouped op over expert-major rows.

Hook for hierarchical storage (:mod:`paddle_semoe.storage`): a GroupedExperts built inside
:func:`deferred_expert_weights` allocates no weight stacks (Paddle's RNG still advances exactly
as if it had, so every other parameter gets the same initial values), and its ``forward`` asks
its ``weight_source`` for the weights of the experts the batch activates.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Protocol

import paddle
import paddle.nn as nn

from paddle_semoe import ops
from paddle_semoe.params import mark_params
from paddle_semoe.ops import reference

_DEFERRED: contextvars.ContextVar[bool] = contextvars.ContextVar("semoe_deferred_expert_weights", default=False)
_RNG_CHUNK = 1 << 16  # even: a normal draw of N values consumes the generator like N/chunk draws of chunk values


@contextlib.contextmanager
def deferred_expert_weights(enabled: bool = True) -> Iterator[None]:
    """GroupedExperts built in this context (this thread/task only) get no weight stacks.

    Their parameters would be drawn from Paddle's global generator; the same number of draws is
    made and discarded, so everything built afterwards is initialized exactly as without the
    context. A weight source must be attached (``experts.weight_source = ...``) before use.
    """
    token = _DEFERRED.set(bool(enabled))
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def _advance_rng_like_normal(numel: int) -> None:
    """Consume Paddle's CPU generator as one ``Normal`` initialization of ``numel`` values would
    (draws in even-sized chunks leave the generator in the same state as one draw)."""
    for start in range(0, numel, _RNG_CHUNK):
        paddle.normal(0.0, 1.0, [min(_RNG_CHUNK, numel - start)])


class ExpertWeightSource(Protocol):
    """Provides the weights of the experts a forward activates (see paddle_semoe.storage)."""

    def run(self, rows_RD: paddle.Tensor, counts_E: paddle.Tensor, compute: Callable[..., paddle.Tensor]) -> paddle.Tensor:
        """Call ``compute(rows, counts_A, w1[A,D,F], b1[A,F], w2[A,F,D], b2[A,D])`` on the
        activated experts' weights (zero-count experts may be dropped) and return its result."""
        ...


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
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation = activation
        self.backend = backend
        self.weight_source: ExpertWeightSource | None = None
        if _DEFERRED.get():
            _advance_rng_like_normal(num_experts * d_model * d_ff)  # w1 (b1, b2 are constants)
            _advance_rng_like_normal(num_experts * d_ff * d_model)  # w2
            self.w1 = self.b1 = self.w2 = self.b2 = None
            return
        normal = nn.initializer.Normal(std=init_std)
        zeros = nn.initializer.Constant(0.0)
        self.w1 = self.create_parameter([num_experts, d_model, d_ff], default_initializer=normal)
        self.b1 = self.create_parameter([num_experts, d_ff], default_initializer=zeros)
        self.w2 = self.create_parameter([num_experts, d_ff, d_model], default_initializer=normal)
        self.b2 = self.create_parameter([num_experts, d_model], default_initializer=zeros)
        mark_params([self.w1, self.b1, self.w2, self.b2], "expert")

    def forward(self, rows_RD: paddle.Tensor, counts_E: paddle.Tensor) -> paddle.Tensor:
        """rows [R, D] expert-major, counts int32 [E] -> [R, D] (zeros past sum(counts))."""
        if self.weight_source is not None:
            return self.weight_source.run(rows_RD, counts_E, self.compute)
        if self.w1 is None:
            raise RuntimeError(
                "GroupedExperts built under deferred_expert_weights() has no weights: attach a weight source "
                "(paddle_semoe.storage.tiered.TieredExperts) before running it"
            )
        return self.compute(rows_RD, counts_E, self.w1, self.b1, self.w2, self.b2)

    def compute(
        self, rows_RD: paddle.Tensor, counts_E: paddle.Tensor, w1: paddle.Tensor, b1: paddle.Tensor,
        w2: paddle.Tensor, b2: paddle.Tensor,
    ) -> paddle.Tensor:
        """The grouped FFN on given weights w1 [E,D,F], b1 [E,F], w2 [E,F,D], b2 [E,D] (this
        layer's own, a weight source's, or graph inputs in the exported experts graph)."""
        return ops.grouped_ffn(rows_RD, counts_E, w1, b1, w2, b2, activation=self.activation, backend=self.backend)

    def forward_sequential(self, rows_RD: paddle.Tensor, counts_E: paddle.Tensor) -> paddle.Tensor:
        """Reference: a plain loop of per-expert matmuls."""
        return reference.grouped_ffn(
            rows_RD, counts_E, self.w1, self.b1, self.w2, self.b2, self.activation
        )
