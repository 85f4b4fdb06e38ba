"""Optimizers of an MoE model and the learning-rate schedule.

Dense and gate parameters share one AdamW (wrapped by Fleet's ZeRO-1
``DygraphShardingOptimizer`` when ``sharding_degree > 1``: each rank of the sharding group
updates its partition and broadcasts it). Expert parameters, owned by one rank each, get their
own AdamW that never communicates. Gradients arrive already synchronized (see
:mod:`paddle_semoe.comm.fusion`), so neither optimizer reduces gradients or clips.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import paddle

from paddle_semoe.engine.config import OptimConfig
from paddle_semoe.moe.params import classify_parameters

logger = logging.getLogger(__name__)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _adamw(params: list, cfg: OptimConfig) -> paddle.optimizer.AdamW:
    decay = {p.name for p in params if len(p.shape) >= 2}
    return paddle.optimizer.AdamW(
        learning_rate=cfg.lr,
        parameters=params,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        epsilon=cfg.eps,
        weight_decay=cfg.weight_decay,
        apply_decay_param_fun=lambda name: name in decay,
    )


class MoEOptimizer:
    """AdamW for dense+gate parameters (optionally ZeRO-1 sharded) and for experts.

    Args:
        model: the model; parameter classes come from :func:`classify_parameters`.
        cfg: optimizer settings.
        hcg: Fleet's hybrid communicate group when ``sharding_degree > 1`` (ZeRO stage 1).
    """

    def __init__(self, model: paddle.nn.Layer, cfg: OptimConfig, hcg=None):
        groups = classify_parameters(model)
        self.dense_params = [p for _, p in groups["dense"]] + [p for _, p in groups["gate"]]
        self.expert_params = [p for _, p in groups["expert"]]
        self.dense = _adamw(self.dense_params, cfg) if self.dense_params else None
        self.expert = _adamw(self.expert_params, cfg) if self.expert_params else None
        self.sharded = None
        if hcg is not None and self.dense is not None and hcg.get_sharding_parallel_world_size() > 1:
            from paddle.distributed.fleet.meta_optimizers.dygraph_optimizer.dygraph_sharding_optimizer import (
                DygraphShardingOptimizer,
            )

            self.sharded = DygraphShardingOptimizer(self.dense, hcg)
            logger.info(
                "ZeRO-1: dense optimizer states sharded over %d ranks", hcg.get_sharding_parallel_world_size()
            )

    def replace_optimizers(self, opts: list) -> None:
        """Adopt optimizers returned by ``paddle.amp.decorate`` (same order as ``optimizers()``)."""
        it = iter(opts)
        if self.dense is not None:
            self.dense = next(it)
        if self.expert is not None:
            self.expert = next(it)

    def optimizers(self) -> Iterator[paddle.optimizer.Optimizer]:
        for opt in (self.dense, self.expert):
            if opt is not None:
                yield opt

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers():
            opt.set_lr(lr)

    @paddle.no_grad()
    def step(self) -> None:
        if self.sharded is not None:
            self.sharded.step()
        elif self.dense is not None:
            self.dense.step()
        if self.expert is not None:
            self.expert.step()

    def clear_grad(self) -> None:
        for opt in self.optimizers():
            opt.clear_grad(set_to_zero=False)

    def state_dicts(self) -> dict[str, dict]:
        """Accumulators by optimizer part (``dense`` / ``expert``), keyed by Paddle names."""
        return {
            name: opt.state_dict()
            for name, opt in (("dense", self.dense), ("expert", self.expert))
            if opt is not None
        }

    def load_state_dicts(self, states: dict[str, dict]) -> None:
        for name, opt in (("dense", self.dense), ("expert", self.expert)):
            if opt is not None and states.get(name):
                opt.set_state_dict(states[name])
