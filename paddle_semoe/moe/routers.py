"""Routers: one typed interface, one class per routing rule.

A router turns tokens ``x [T, D]`` into a :class:`~paddle_semoe.moe.dispatch.Dispatch` (the
expert-major rows, positions, combine weights) through the fused ``gate_dispatch`` op. Every
router has the same three parts, and a new router is one subclass that overrides them:

* :meth:`Router.scores`: the linear scores ``logits = x @ W`` ([D, E] float32 weight, tagged as
  a ``gate`` parameter) plus the gate kind's training noise;
* :meth:`Router.select_bias`: an optional float32 ``[E]`` or ``[T, E]`` added to the scores for
  the top-k *selection only* (the combine weights never see it);
* :meth:`Router.dispatch_args`: the op arguments (k, capacity, capacity rule, score function).

The op (``custom_ops/README.md``) then does score function, selection, capacity, positions and
the row permutation in one kernel on CPU and GPU, so every router goes through the same
expert-parallel exchange, checkpoints (``weight`` is a gate parameter) and export.

Routers (``MoESettings.router``; each class states its rule): ``token_choice``
(:class:`TokenChoiceRouter`: GShard, Switch, Mixtral, DeepSeekMoE), ``aux_free``
(:class:`AuxFreeRouter`: DeepSeek-V3 auxiliary-loss-free balancing), ``device_limited``
(:class:`DeviceLimitedRouter`: DeepSeek-V2, bounds a token's all-to-all fan-out) and
``expert_choice`` (:class:`ExpertChoiceRouter`: Zhou et al. 2022; not causal, so models with
causal generation refuse it).
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import numpy as np
import paddle
import paddle.nn as nn

from paddle_semoe import ops
from paddle_semoe.moe.config import MoEConfig
from paddle_semoe.moe.dispatch import Dispatch, dispatch
from paddle_semoe.params import mark_params

__all__ = [
    "ROUTERS",
    "AuxFreeRouter",
    "DeviceLimitedRouter",
    "ExpertChoiceRouter",
    "Router",
    "RouterOutput",
    "TokenChoiceRouter",
    "make_router",
    "update_balance_biases",
]


class RouterOutput(NamedTuple):
    logits: paddle.Tensor  # [T, E] float32
    noise: paddle.Tensor | None  # [T] float32 uniform draws for GShard random routing
    select_bias: paddle.Tensor | None = None  # [E] or [T, E] float32, selection only


class Router(nn.Layer):
    """Base router: linear scores ``logits = x @ W`` in float32 (``W`` [D, E], a gate param).

    Gate kinds (``MoEConfig.gate``), applied only while training:
      * ``switch``: multiplicative jitter of the router input, x * U(1 - eps, 1 + eps);
      * ``gshard``: draws ``noise ~ U(0, 1)`` per token for random routing of the 2nd expert.

    Subclasses override :meth:`select_bias` and/or :meth:`dispatch_args`; :meth:`route` is the
    one entry point the MoE layer calls.
    """

    kind: ClassVar[str] = "token_choice"

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = self.create_parameter(
            [config.d_model, config.num_experts],
            dtype="float32",
            default_initializer=nn.initializer.Normal(std=config.init_std),
        )
        mark_params([self.weight], "gate")

    def scores(self, x_TD: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor | None]:
        """(logits [T, E] float32, GShard noise [T] or None)."""
        cfg = self.config
        h = x_TD.astype("float32")
        if self.training and cfg.gate == "switch" and cfg.jitter_eps > 0:
            h = h * paddle.uniform(h.shape, dtype="float32", min=1.0 - cfg.jitter_eps, max=1.0 + cfg.jitter_eps)
        with paddle.amp.auto_cast(enable=False):  # routing stays in float32 under AMP
            logits = paddle.matmul(h, self.weight.astype("float32"))
        noise = None
        if self.training and cfg.gate == "gshard":
            noise = paddle.uniform([x_TD.shape[0]], dtype="float32", min=0.0, max=1.0)
        return logits, noise

    def select_bias(self, logits_TE: paddle.Tensor) -> paddle.Tensor | None:
        """Selection-only bias [E] or [T, E] (None: select by the scores alone)."""
        return None

    def dispatch_args(self, tokens: int, capacity_factor: float) -> dict:
        """Keyword arguments of :func:`paddle_semoe.moe.dispatch.dispatch` for T tokens."""
        cfg = self.config
        return dict(
            top_k=cfg.k,
            capacity_factor=capacity_factor,
            normalize=cfg.normalize,
            capacity_rule=cfg.capacity_rule,
            batch_priority=cfg.batch_priority,
            min_capacity=cfg.min_capacity,
            score_fn=cfg.score_fn,
        )

    def forward(self, x_TD: paddle.Tensor) -> RouterOutput:
        logits, noise = self.scores(x_TD)
        return RouterOutput(logits, noise, self.select_bias(logits))

    def route(self, x_TD: paddle.Tensor, *, capacity_factor: float) -> tuple[Dispatch, paddle.Tensor]:
        """Score, select and dispatch ``x [T, D]`` -> (Dispatch, logits [T, E]). No communication."""
        out = self(x_TD)
        d = dispatch(
            x_TD,
            out.logits,
            noise_T=out.noise,
            select_bias=out.select_bias,
            backend=self.config.ops_backend,
            **self.dispatch_args(int(x_TD.shape[0]), capacity_factor),
        )
        return d, out.logits


class TokenChoiceRouter(Router):
    """Each token picks its top-k experts (the gate kinds topk / gshard / switch)."""

    kind = "token_choice"


class AuxFreeRouter(Router):
    """DeepSeek-V3 auxiliary-loss-free balancing: ``balance_bias`` [E] steers selection only.

    While training, :meth:`route` adds each batch's expert load (selected assignments per
    expert, before capacity) to ``pending_load``; :func:`update_balance_biases` (called by the
    trainer after every optimizer step) sums it over all ranks and applies
    ``bias += rate * sign(mean(load) - load)``. ``balance_bias`` is a persistable buffer: it is
    in ``state_dict`` and in exported programs; it never receives a gradient.
    """

    kind = "aux_free"

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.register_buffer("balance_bias", paddle.zeros([config.num_experts], dtype="float32"), persistable=True)
        self.register_buffer("pending_load", paddle.zeros([config.num_experts], dtype="float32"), persistable=False)

    def select_bias(self, logits_TE: paddle.Tensor) -> paddle.Tensor:
        return self.balance_bias

    def route(self, x_TD: paddle.Tensor, *, capacity_factor: float) -> tuple[Dispatch, paddle.Tensor]:
        d, logits = super().route(x_TD, capacity_factor=capacity_factor)
        if self.training:
            with paddle.no_grad():
                load = ops.expert_count(d.expert_ids, self.config.num_experts, backend=self.config.ops_backend)
                self.pending_load.set_value(self.pending_load + load.astype("float32"))
        return d, logits

    def take_pending_load(self) -> paddle.Tensor:
        """The load [E] float32 accumulated since the last update (and reset it to zero)."""
        load = self.pending_load.clone()
        self.pending_load.set_value(paddle.zeros_like(self.pending_load))
        return load

    def apply_load(self, load_E) -> None:
        """``bias += rate * sign(mean(load) - load)`` for a global load [E] (Tensor or array)."""
        load = np.asarray(load_E.numpy() if hasattr(load_E, "numpy") else load_E, dtype=np.float64).reshape(-1)
        if load.shape != (self.config.num_experts,):
            raise ValueError(f"load must have {self.config.num_experts} entries, got shape {load.shape}")
        step = self.config.bias_update_rate * np.sign(load.mean() - load)
        self.balance_bias.set_value((self.balance_bias.numpy().astype(np.float64) + step).astype(np.float32))


class DeviceLimitedRouter(Router):
    """DeepSeek-V2 device-limited routing: a token's experts come from at most
    ``device_limit`` of the ``device_groups`` contiguous expert groups, the groups holding its
    best expert scores (ties: lower group index). Realized as a [T, E] selection bias of 0 on
    the allowed groups and -inf elsewhere; the combine weights are the unmasked scores."""

    kind = "device_limited"

    def select_bias(self, logits_TE: paddle.Tensor) -> paddle.Tensor:
        cfg = self.config
        T, E = logits_TE.shape
        G, M = cfg.device_groups, cfg.device_limit
        # scores are monotone in the logits within a token (softmax and sigmoid alike), so the
        # best expert of each group by logit is its best by score
        best_TG = logits_TE.detach().reshape([T, G, E // G]).max(axis=-1)
        groups_TM = paddle.argsort(-best_TG, axis=-1, stable=True)[:, :M]
        blocked_TG = paddle.full([T, G], -math.inf, dtype="float32")
        zeros_TM = paddle.zeros_like(groups_TM, dtype="float32")
        bias_TG = paddle.put_along_axis(blocked_TG, groups_TM, zeros_TM, axis=1)
        return bias_TG.unsqueeze(-1).expand([T, G, E // G]).reshape([T, E])


class ExpertChoiceRouter(Router):
    """Expert-choice routing: each expert keeps its top-c tokens by score,
    ``c = ceil(capacity_factor * T * top_k / E)`` (capacity_factor <= 0: c = T).

    Through the same op: every token offers all E experts (``top_k = E``, unnormalized
    weights = scores) and the ``probs`` capacity rule keeps each expert's c best; the exact
    integer c reaches the op as ``min_capacity`` over a capacity factor of 1e-6 (which alone
    gives a capacity of 1 for T <= 1e6)."""

    kind = "expert_choice"

    def dispatch_args(self, tokens: int, capacity_factor: float) -> dict:
        cfg = self.config
        c = tokens if capacity_factor <= 0 else ops.expert_capacity(tokens, cfg.num_experts, cfg.k, capacity_factor)
        return dict(
            top_k=cfg.num_experts,
            capacity_factor=1e-6,
            normalize=False,
            capacity_rule="probs",
            batch_priority=False,
            min_capacity=max(min(c, tokens), cfg.min_capacity),
            score_fn=cfg.score_fn,
        )


ROUTERS: dict[str, type[Router]] = {
    cls.kind: cls for cls in (TokenChoiceRouter, AuxFreeRouter, DeviceLimitedRouter, ExpertChoiceRouter)
}


def make_router(config: MoEConfig) -> Router:
    """The router class named by ``config.router``."""
    if config.router not in ROUTERS:
        raise ValueError(f"router must be one of {tuple(ROUTERS)}, got {config.router!r}")
    return ROUTERS[config.router](config)


def update_balance_biases(model: nn.Layer, all_reduce_sum=None) -> list[np.ndarray]:
    """After an optimizer step: sum every :class:`AuxFreeRouter`'s pending load over all ranks
    (``all_reduce_sum(tensor)`` in place over the data- and expert-parallel ranks; None: one
    process) and update its bias. Returns the global loads [E] in model order (for metrics)."""
    loads = []
    for layer in [m for m in model.sublayers(include_self=True) if isinstance(m, AuxFreeRouter)]:
        load = layer.take_pending_load()
        if all_reduce_sum is not None:
            all_reduce_sum(load)
        layer.apply_load(load)
        loads.append(load.numpy())
    return loads
