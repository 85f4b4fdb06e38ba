"""Optimizers of an MoE model and the learning-rate schedule.

Dense and gate parameters share one AdamW (wrapped by Fleet's ZeRO-1
``DygraphShardingOptimizer`` when ``sharding_degree > 1``: each rank of the sharding group
updates its partition and broadcasts it). Expert parameters, owned by one rank each, get their
own AdamW that never communicates. Gradients arrive already synchronized (see
:mod:`paddle_semoe.comm.fusion`), so neither optimizer reduces gradients or clips.

With ``expert_update: lazy`` the experts of every GroupedExperts layer are updated by a lazy
updater instead (:mod:`paddle_semoe.storage.lazy`: resident stacks, or the tiered store when
``storage.enabled``): only experts that received tokens in the step change.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import paddle

from paddle_semoe import ops
from paddle_semoe.engine.config import OptimConfig
from paddle_semoe.moe.experts import GroupedExperts
from paddle_semoe.params import classify_parameters
from paddle_semoe.storage.adamw import AdamWHyper
from paddle_semoe.storage.lazy import ResidentLazyExperts

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


@paddle.no_grad()
def scale_grads_(params: Iterable[paddle.Tensor], scale: float) -> None:
    """Multiply every present gradient by ``scale`` in place (nothing when it is 1)."""
    if scale != 1.0:
        for p in params:
            if p.grad is not None:
                paddle.assign(p.grad * scale, output=p.grad)


@dataclass(frozen=True)
class _FusedPlan:
    """Per parameter (same order): Paddle's AdamW accumulators and the weight-decay flag."""

    moment1: list[paddle.Tensor]
    moment2: list[paddle.Tensor]
    beta1_pow: list[paddle.Tensor]
    beta2_pow: list[paddle.Tensor]
    decay_mask: list[bool]


class FusedAdamW(paddle.optimizer.AdamW):
    """``paddle.optimizer.AdamW`` whose :meth:`step` updates every parameter in ONE
    multi-tensor kernel call (:func:`paddle_semoe.ops.adamw_step`) instead of one ``adamw_``
    op per parameter, with an optional gradient scale (a clipping coefficient) folded in.

    The accumulators are Paddle's own (``moment1``, ``moment2``, beta powers, created by the
    base class), so ``state_dict``/``set_state_dict`` and checkpoints are unchanged, and the
    update is the same formula as Paddle's kernel (equal to ~1 ulp). Falls back to the base
    class's step for what the kernel does not cover: GPU or non-float32 parameters, master
    weights (AMP O2), amsgrad, lr ratios, a gradient-clip object.

    Args:
        backend: ops backend (``auto``/``custom``/``reference``), as ``GPTConfig.ops_backend``.
        Other arguments: ``paddle.optimizer.AdamW``'s.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._ops_backend = backend
        # (key of the parameter set and settings, its _FusedPlan or None when not fusable)
        self._plan: tuple[tuple, _FusedPlan | None] | None = None

    def set_state_dict(self, state_dict) -> None:
        self._plan = None  # the accumulators are looked up again
        super().set_state_dict(state_dict)

    def _plan_for(self, params: list) -> _FusedPlan | None:
        """The accumulators and decay flags of ``params`` (None: not fusable), looked up on the
        first step of a parameter set and reused while the set and the settings stay the same.
        The kernel checks every tensor's dtype, device and size on each call."""
        key = (tuple(id(p) for p in params), self._multi_precision, self._lr_ratio is None,
               self._grad_clip is None, getattr(self, "_amsgrad", False))
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        plan = None
        if self._fusable(params):
            self._create_accumulators(paddle.static.default_main_program().global_block(), params)
            acc = lambda name: [self._get_accumulator_master(name, p) for p in params]  # noqa: E731
            decay = self._apply_decay_param_fun
            plan = _FusedPlan(
                acc(self._moment1_acc_str), acc(self._moment2_acc_str),
                acc(self._beta1_pow_acc_str), acc(self._beta2_pow_acc_str),
                [decay is None or bool(decay(p.name)) for p in params],
            )
        self._plan = (key, plan)
        return plan

    def _fusable(self, params: list) -> bool:
        return (
            not self._multi_precision
            and not getattr(self, "_amsgrad", False)
            and self._lr_ratio is None
            and self._grad_clip is None
            and not isinstance(self._weight_decay, paddle.Tensor)
            and all(p.dtype == paddle.float32 and p.place.is_cpu_place() for p in params)
        )

    @paddle.no_grad()
    def step(self, grad_scale: float = 1.0) -> None:
        """One update of every parameter that has a gradient; gradients count ``grad_scale`` times."""
        params, grads = [], []
        for p in self._parameter_list:
            g = None if p.stop_gradient else p.grad
            if g is not None:
                params.append(p)
                grads.append(g)
        if not params:
            return
        plan = self._plan_for(params)
        if plan is None:
            scale_grads_(params, grad_scale)
            super().step()
            return
        ops.adamw_step(
            params, grads, plan.moment1, plan.moment2, plan.beta1_pow, plan.beta2_pow,
            lr=self.get_lr(), beta1=float(self._beta1), beta2=float(self._beta2), epsilon=float(self._epsilon),
            weight_decay=float(self._weight_decay), decay_mask=plan.decay_mask,
            grad_scale=grad_scale, backend=self._ops_backend,
        )


def _adamw(params: list, cfg: OptimConfig, backend: str = "auto") -> FusedAdamW:
    decay = {p.name for p in params if len(p.shape) >= 2}
    return FusedAdamW(
        learning_rate=cfg.lr, parameters=params, beta1=cfg.beta1, beta2=cfg.beta2, epsilon=cfg.eps,
        weight_decay=cfg.weight_decay, apply_decay_param_fun=lambda name: name in decay,
        backend=backend,
    )


def _step(opt: paddle.optimizer.Optimizer, grad_scale: float) -> None:
    if isinstance(opt, FusedAdamW):
        opt.step(grad_scale)
        return
    scale_grads_(opt._parameter_list, grad_scale)
    opt.step()


class MoEOptimizer:
    """AdamW for dense+gate parameters (optionally ZeRO-1 sharded) and for experts.

    Args:
        model: the model; parameter classes come from :func:`classify_parameters`.
        cfg: optimizer settings.
        hcg: Fleet's hybrid communicate group when ``sharding_degree > 1`` (ZeRO stage 1).
    """

    def __init__(self, model: paddle.nn.Layer, cfg: OptimConfig, hcg=None, lazy_experts=None, sharded_dense=None):
        groups = classify_parameters(model)
        self.dense_params = [p for _, p in groups["dense"]] + [p for _, p in groups["gate"]]
        # storage.shard_dense: a ShardedDenseParams (paddle_semoe.storage.dense_shard) owns these
        self.sharded_dense = sharded_dense
        if sharded_dense is not None:
            owned = sharded_dense.param_ids()
            self.dense_params = [p for p in self.dense_params if id(p) not in owned]
        self.expert_params = [p for _, p in groups["expert"]]
        self.lazy = None  # LazyExpertUpdater (paddle_semoe.storage.lazy) with expert_update=lazy
        self._lr = cfg.lr
        if cfg.expert_update == "lazy":
            hyper = AdamWHyper(cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay)
            experts = [m for m in model.sublayers() if isinstance(m, GroupedExperts)]
            self.lazy = lazy_experts if lazy_experts is not None else ResidentLazyExperts(experts, hyper)
            taken = self.lazy.param_ids()
            self.expert_params = [p for p in self.expert_params if id(p) not in taken]
        elif lazy_experts is not None:
            raise ValueError("a lazy expert updater needs optim.expert_update=lazy")
        backend = getattr(getattr(model, "config", None), "ops_backend", "auto")
        self.dense = _adamw(self.dense_params, cfg, backend) if self.dense_params else None
        self.expert = _adamw(self.expert_params, cfg, backend) if self.expert_params else None
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
        it, pair = iter(opts), (self.dense, self.expert)
        self.dense, self.expert = (None if opt is None else next(it) for opt in pair)

    def optimizers(self) -> Iterator[paddle.optimizer.Optimizer]:
        return (opt for opt in (self.dense, self.expert) if opt is not None)

    def set_lr(self, lr: float) -> None:
        self._lr = lr
        for opt in self.optimizers():
            opt.set_lr(lr)

    @paddle.no_grad()
    def step(self, expert_grad_scale: float = 1.0, grad_scale: float = 1.0) -> None:
        """One update. ``expert_grad_scale``: clip coefficient for the lazy expert update
        (the other gradients were clipped in place). ``grad_scale``: a clip coefficient for the
        dense and expert AdamW, folded into their fused kernel (instead of clipping in place)."""
        if self.sharded is not None:
            scale_grads_(self.dense_params, grad_scale)
            self.sharded.step()
        elif self.dense is not None:
            _step(self.dense, grad_scale)
        if self.expert is not None:
            _step(self.expert, grad_scale)
        if self.lazy is not None:
            self.lazy.step(self._lr, expert_grad_scale)
        if self.sharded_dense is not None:  # its AdamW takes no gradient scale: clip in place
            scale_grads_(self.sharded_dense.params, grad_scale)
            self.sharded_dense.step(self._lr)

    def sync_params(self) -> None:
        """Wait until every parameter holds its latest value (sharded dense gathers done)."""
        if self.sharded_dense is not None:
            self.sharded_dense.wait_all()

    def clear_grad(self) -> None:
        # Clear every parameter ourselves: Fleet's ZeRO-1 wrapper narrows the inner optimizer's
        # parameter list to the local partition, so opt.clear_grad() would leave the other
        # partitions' gradients to accumulate into the next step's all-reduce.
        for p in self.dense_params + self.expert_params:
            p.clear_gradient(set_to_zero=False)
        for opt in self.optimizers():
            if not isinstance(opt, FusedAdamW):  # its parameters are among those just cleared
                opt.clear_grad(set_to_zero=False)
        if self.lazy is not None:
            self.lazy.clear_grad()
        if self.sharded_dense is not None:
            self.sharded_dense.clear_grad()

    def state_dicts(self) -> dict[str, dict]:
        """Accumulators by optimizer part (``dense`` / ``expert``), keyed by Paddle names
        (a resident lazy updater's moments join the ``expert`` part under the same scheme)."""
        out = {
            name: opt.state_dict()
            for name, opt in (("dense", self.dense), ("expert", self.expert))
            if opt is not None
        }
        if self.lazy is not None and hasattr(self.lazy, "state_dict"):
            out["expert"] = {**out.get("expert", {}), **self.lazy.state_dict()}
        if self.sharded_dense is not None:  # collective: gathers the moment shards
            out["dense"] = {**out.get("dense", {}), **self.sharded_dense.state_dict()}
        return out

    def load_state_dicts(self, states: dict[str, dict]) -> None:
        for name, opt in (("dense", self.dense), ("expert", self.expert)):
            if opt is not None and states.get(name):
                opt.set_state_dict(states[name])
        if self.lazy is not None and hasattr(self.lazy, "load_state_dict") and states.get("expert"):
            self.lazy.load_state_dict(states["expert"])
        if self.sharded_dense is not None and states.get("dense"):
            self.sharded_dense.load_state_dict(states["dense"])
