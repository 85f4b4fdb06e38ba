"""The MoE FFN layer: router -> fused dispatch -> (all-to-all) -> grouped experts -> combine.

Data flow for ``x[..., D]`` flattened to ``x[T, D]``::

    logits[T,E] = Router(x)                 (float32, local, no communication)
    Dispatch    = gate_dispatch(x, logits)  (softmax, top-k, capacity, expert-major rows)
    rows        = exchange.dispatch(rows)   (expert parallelism only)
    rows        = GroupedExperts(rows)
    rows        = exchange.combine(rows)    (expert parallelism only)
    y[T,D]      = combine(rows, Dispatch)
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import paddle
import paddle.nn as nn

from paddle_semoe import ops
from paddle_semoe.moe.config import MoEConfig
from paddle_semoe.moe.dispatch import Dispatch, combine, dispatch
from paddle_semoe.moe.experts import GroupedExperts
from paddle_semoe.moe.gate import Router
from paddle_semoe.moe.losses import load_balance_loss, router_z_loss


class RoutingStats(NamedTuple):
    """Per-forward routing statistics (tensors: read them with ``.numpy()`` when logging)."""

    demand: paddle.Tensor  # [E] int32 routing choices per expert, before capacity
    kept: paddle.Tensor  # [E] int32 rows computed per expert
    dropped_fraction: paddle.Tensor  # [] float32 share of the T*K choices not computed


class MoEOutput(NamedTuple):
    y: paddle.Tensor  # [..., D] layer output, same shape and dtype as the input
    aux_loss: paddle.Tensor  # [] aux_loss_coef * balance_loss + z_loss_coef * z_loss
    balance_loss: paddle.Tensor  # [] unweighted load-balance loss (1.0 = uniform)
    z_loss: paddle.Tensor  # [] unweighted router z-loss
    stats: RoutingStats


class ExpertExchange(Protocol):
    """Moves expert-major rows to the ranks owning the experts and back (see paddle_semoe.comm)."""

    def dispatch(self, rows: paddle.Tensor, counts: paddle.Tensor): ...

    def combine(self, rows: paddle.Tensor, plan): ...


class MoELayer(nn.Layer):
    """A Mixture-of-Experts FFN.

    Args:
        config: the layer's :class:`MoEConfig`.
        exchange: expert-parallel exchange over ``ep`` ranks, or None for all experts local.
            With it, this rank holds ``num_experts // ep`` experts.
        ep_size: the expert-parallel degree the exchange spans (1 without exchange).
    """

    def __init__(self, config: MoEConfig, exchange: ExpertExchange | None = None, ep_size: int = 1):
        super().__init__()
        if ep_size < 1 or config.num_experts % ep_size:
            raise ValueError(
                f"num_experts={config.num_experts} must be divisible by the expert-parallel "
                f"degree {ep_size}"
            )
        if (exchange is None) != (ep_size == 1):
            raise ValueError("an exchange is required exactly when ep_size > 1")
        self.config = config
        self.exchange = exchange
        self.ep_size = ep_size
        self.num_local_experts = config.num_experts // ep_size
        self.router = Router(config)
        self.experts = GroupedExperts(
            self.num_local_experts,
            config.d_model,
            config.d_ff,
            activation=config.activation,
            init_std=config.init_std,
            backend=config.ops_backend,
        )

    def route(self, x_TD: paddle.Tensor) -> Dispatch:
        cfg = self.config
        router_out = self.router(x_TD)
        d = dispatch(
            x_TD,
            router_out.logits,
            top_k=cfg.k,
            capacity_factor=cfg.capacity_factor_for(self.training),
            normalize=cfg.normalize,
            noise_T=router_out.noise,
            backend=cfg.ops_backend,
        )
        return d, router_out.logits

    def forward(self, x: paddle.Tensor) -> MoEOutput:
        cfg = self.config
        if x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoELayer: input last dim must be d_model={cfg.d_model}, got shape {list(x.shape)}")
        shape = x.shape
        x_TD = x.reshape([-1, cfg.d_model])
        d, logits = self.route(x_TD)
        if self.exchange is None:
            rows = self.experts(d.rows, d.counts)
        else:
            local_rows, local_counts, plan = self.exchange.dispatch(d.rows, d.counts)
            rows = self.exchange.combine(self.experts(local_rows, local_counts), plan)
        y_TD = combine(rows, d, backend=cfg.ops_backend)

        demand = ops.expert_count(d.expert_ids, cfg.num_experts, backend=cfg.ops_backend)
        balance = load_balance_loss(d.probs, demand, cfg.k)
        z = router_z_loss(logits)
        aux = cfg.aux_loss_coef * balance + cfg.z_loss_coef * z
        T = x_TD.shape[0]
        kept_total = d.counts.astype("float32").sum()
        dropped = 1.0 - kept_total / float(max(T * cfg.k, 1))
        stats = RoutingStats(demand=demand, kept=d.counts, dropped_fraction=dropped)
        return MoEOutput(
            y=y_TD.reshape(shape).astype(x.dtype),
            aux_loss=aux,
            balance_loss=balance,
            z_loss=z,
            stats=stats,
        )
