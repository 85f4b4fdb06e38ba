"""The MoE FFN layer: router -> fused dispatch -> (all-to-all) -> grouped experts -> combine.

Data flow for ``x[..., D]`` flattened to ``x[T, D]``::

    logits[T,E] = Router(x)                 (float32, local, no communication)
    Dispatch    = gate_dispatch(x, logits)  (softmax, top-k, capacity, expert-major rows)
    rows        = exchange.dispatch(rows)   (expert parallelism only)
    rows        = GroupedExperts(rows)      (weights: the layer's own, or a weight source)
    rows        = exchange.combine(rows)    (expert parallelism only)
    y[T,D]      = combine(rows, Dispatch)

The three steps are public (:meth:`MoELayer.route`, :meth:`MoELayer.run_experts`,
:meth:`MoELayer.combine`) so that the exported static graphs (paddle_semoe.inference.export)
are cut from this code instead of copying it. Serving sets ``eval_dropless``: outside training
the layer then routes without capacity, so a token's output does not depend on which other
tokens share its forward pass (cached decoding equals full recomputation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import paddle
import paddle.nn as nn

from paddle_semoe import ops
from paddle_semoe.moe.config import MoEConfig
from paddle_semoe.moe.dispatch import Dispatch
from paddle_semoe.moe.experts import GroupedExperts
from paddle_semoe.moe.routers import make_router
from paddle_semoe.moe.shared import SharedExperts
from paddle_semoe.moe.losses import load_balance_loss, router_z_loss

PlanT = TypeVar("PlanT")


class RoutingStats(NamedTuple):
    """Per-forward routing statistics (tensors: read them with ``.numpy()`` when logging)."""

    demand: paddle.Tensor  # [E] int32 routing choices per expert, before capacity
    kept: paddle.Tensor  # [E] int32 rows computed per expert
    dropped_fraction: paddle.Tensor  # [] float32 share of the T*K choices not computed
    dropped_by_choice: paddle.Tensor | None = None  # [K] float32 share of the j-th choices not computed
    expertless_fraction: paddle.Tensor | None = None  # [] float32 share of tokens with no expert computed


class MoEOutput(NamedTuple):
    y: paddle.Tensor  # [..., D] layer output, same shape and dtype as the input
    aux_loss: paddle.Tensor  # [] aux_loss_coef * balance_loss + z_loss_coef * z_loss
    balance_loss: paddle.Tensor  # [] unweighted load-balance loss (1.0 = uniform)
    z_loss: paddle.Tensor  # [] unweighted router z-loss
    stats: RoutingStats | None  # None while serving (see MoELayer.forward)


@dataclass(frozen=True)
class Routing:
    """What :meth:`MoELayer.route` decided for one batch of tokens.

    Attributes:
        dispatch: the expert-major rows and the record ``combine`` consumes.
        logits: [T, E] float32 router logits (for the z-loss).
    """

    dispatch: Dispatch
    logits: paddle.Tensor


class ExpertExchange(Protocol[PlanT]):
    """Moves expert-major rows to the ranks owning the experts and back.

    Implemented by :class:`paddle_semoe.comm.ExpertExchange` (Gloo / NCCL communicators) and
    :class:`paddle_semoe.comm.nccl_fused.FusedNcclExchange`. ``PlanT`` is the exchange's own
    record of one dispatch: the layer hands it back to ``combine`` without reading it.
    """

    @property
    def ep_degree(self) -> int:
        """Ranks in the expert-parallel group; each holds ``num_experts / ep_degree`` experts."""
        ...

    @property
    def num_local_experts(self) -> int:
        """Experts held by this rank."""
        ...

    def dispatch(self, rows: paddle.Tensor, counts: paddle.Tensor, /) -> tuple[paddle.Tensor, paddle.Tensor, PlanT]:
        """``rows [R, D]``, ``counts int32 [E]`` -> ``(local_rows [R_loc, D], local_counts int32 [E_local], plan)``."""
        ...

    def combine(self, rows: paddle.Tensor, plan: PlanT, /) -> paddle.Tensor:
        """``rows [R_loc, D]`` (expert outputs) -> ``[R, D]`` in the sender's layout of ``dispatch``."""
        ...


class MoELayer(nn.Layer):
    """A Mixture-of-Experts FFN.

    Args:
        config: the layer's :class:`MoEConfig`.
        exchange: expert-parallel exchange, or None for all experts local. With it, this rank
            holds ``num_experts // exchange.ep_degree`` experts.
        eval_dropless: route without capacity while not training (serving); see the module doc.
    """

    def __init__(self, config: MoEConfig, exchange: ExpertExchange[Any] | None = None, *, eval_dropless: bool = False):
        super().__init__()
        ep_size = 1 if exchange is None else exchange.ep_degree
        if ep_size < 1 or config.num_experts % ep_size:
            raise ValueError(
                f"num_experts={config.num_experts} must be divisible by the expert-parallel degree {ep_size}"
            )
        if exchange is not None and exchange.num_local_experts != config.num_experts // ep_size:
            raise ValueError(
                f"the exchange serves {exchange.num_local_experts} experts per rank, but num_experts="
                f"{config.num_experts} over ep_degree={ep_size} gives {config.num_experts // ep_size}"
            )
        self.config = config
        self.exchange = exchange
        self.eval_dropless = eval_dropless
        self.serving = False  # GPTMoE.set_serving: outside training, no losses or statistics
        self.num_local_experts = config.num_experts // ep_size
        self.router = make_router(config)
        self.experts = GroupedExperts(
            self.num_local_experts,
            config.d_model,
            config.d_ff,
            activation=config.activation,
            init_std=config.init_std,
            backend=config.ops_backend,
        )
        # DeepSeekMoE shared experts: always-on, replicated like dense parameters.
        self.shared_experts = None
        if config.num_shared_experts > 0:
            self.shared_experts = SharedExperts(
                config.num_shared_experts, config.d_model, config.shared_d_ff or config.d_ff,
                activation=config.activation, init_std=config.init_std, backend=config.ops_backend,
            )

    def capacity_factor(self) -> float:
        """The capacity factor of the current mode; 0.0 means dropless."""
        if self.eval_dropless and not self.training:
            return 0.0
        return self.config.capacity_factor_for(self.training)

    def route(self, x_TD: paddle.Tensor) -> Routing:
        """Gate and dispatch ``x [T, D]`` (no communication)."""
        return Routing(*self.router.route(x_TD, capacity_factor=self.capacity_factor()))

    def run_experts(self, rows_RD: paddle.Tensor, counts_E: paddle.Tensor) -> paddle.Tensor:
        """Expert-major ``rows [R, D]`` with ``counts int32 [E]`` -> expert outputs ``[R, D]``,
        through the exchange when the experts are spread over an expert-parallel group."""
        if self.exchange is None:
            return self.experts(rows_RD, counts_E)
        local_rows, local_counts, plan = self.exchange.dispatch(rows_RD, counts_E)
        return self.exchange.combine(self.experts(local_rows, local_counts), plan)

    def combine(self, rows_RD: paddle.Tensor, weights_TK: paddle.Tensor, positions_TK: paddle.Tensor) -> paddle.Tensor:
        """Weighted un-permute of expert outputs (``Dispatch.weights/positions``) -> ``[T, D]``."""
        return ops.combine(rows_RD, weights_TK, positions_TK, backend=self.config.ops_backend)

    def forward(self, x: paddle.Tensor) -> MoEOutput:
        cfg = self.config
        if x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoELayer: input last dim must be d_model={cfg.d_model}, got shape {list(x.shape)}")
        x_TD = x.reshape([-1, cfg.d_model])
        routing = self.route(x_TD)
        d = routing.dispatch
        y_TD = self.combine(self.run_experts(d.rows, d.counts), d.weights, d.positions)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD).astype(y_TD.dtype)
        y = y_TD.reshape(x.shape).astype(x.dtype)
        if self.serving and not self.training and not paddle.is_grad_enabled():
            # serving: nothing reads the losses or the routing statistics, and their dozen small
            # ops per layer are a tenth of a decode step; zeros and no statistics instead
            zero = paddle.zeros([], dtype="float32")
            return MoEOutput(y, aux_loss=zero, balance_loss=zero, z_loss=zero, stats=None)

        K = d.expert_ids.shape[1]  # cfg.k, or E for expert choice
        demand = ops.expert_count(d.expert_ids, cfg.num_experts, backend=cfg.ops_backend)
        balance = load_balance_loss(d.probs, demand, K)
        z = router_z_loss(routing.logits)
        aux = cfg.aux_loss_coef * balance + cfg.z_loss_coef * z
        T = x_TD.shape[0]
        kept_total = d.counts.astype("float32").sum()
        dropped = 1.0 - kept_total / float(max(T * K, 1))
        miss_TK = (d.positions < 0).astype("float32")
        if T > 0:
            by_choice, expertless = miss_TK.mean(axis=0), miss_TK.min(axis=1).mean()
        else:
            by_choice, expertless = paddle.zeros([K], dtype="float32"), paddle.zeros([], dtype="float32")
        stats = RoutingStats(demand, d.counts, dropped, by_choice, expertless)
        return MoEOutput(y, aux, balance, z, stats)
