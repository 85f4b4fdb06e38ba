"""Lazy expert update for resident experts, and the gradient clipping both paths share.

``optim.expert_update: lazy`` (semantics in :mod:`paddle_semoe.storage.adamw`) with experts kept
as resident parameter stacks: :class:`ResidentLazyExperts` keeps the moments as numpy arrays
and updates, in place, only the experts that received tokens. The tiered store
(:class:`~paddle_semoe.storage.tiered.TieredExperts`) implements the same interface on states in
the host cache / on SSD. Both compute the gradient norm the same way (dense and gate gradients
as before; expert gradients as a float64 sum of per-tensor sums of squares over the activated
experts, in the order MoE layer, local expert, w1/b1/w2/b2) and clip expert gradients inside the
update, so an all-resident and a tiered run with the same config and seed give bit-identical
losses.
"""

from __future__ import annotations

import math
from typing import Iterable, Protocol, Sequence

import numpy as np
import paddle

from paddle_semoe.comm.fusion import clip_by_global_norm_
from paddle_semoe.comm.topology import Topology
from paddle_semoe.comm.transport import Communicator
from paddle_semoe.params import param_class
from paddle_semoe.storage.adamw import AdamWHyper, adamw_update_, sq_sum, step_scalars
from paddle_semoe.storage.stats import StorageStats

_ACCS = ("moment1_0", "moment2_0")
_STEP_ACC = "lazy_step_0"


def tensor_view(t: paddle.Tensor) -> np.ndarray:
    """A writable numpy view (no copy) of a contiguous float32 CPU tensor."""
    if t.dtype != paddle.float32:
        raise ValueError(f"expected a float32 tensor, got {t.dtype}")
    if not t.place.is_cpu_place():
        raise ValueError(f"expected a CPU tensor, got one on {t.place}")
    if not t.is_contiguous():
        t = t.contiguous()
    return np.from_dlpack(t.detach())


class LazyExpertUpdater(Protocol):
    """What the trainer and :class:`~paddle_semoe.engine.optim.MoEOptimizer` call in lazy mode."""

    def param_ids(self) -> set[int]: ...
    def after_backward(self) -> None: ...
    def set_active(self, kept_local: Sequence[np.ndarray]) -> None: ...
    def sq_norm(self) -> float: ...
    def step(self, lr: float, grad_scale: float) -> None: ...
    def discard(self) -> None: ...
    def clear_grad(self) -> None: ...
    def interval_scalars(self) -> dict[str, float]: ...


class ResidentLazyExperts:
    """Lazy AdamW over resident :class:`~paddle_semoe.moe.experts.GroupedExperts` stacks.

    Args:
        experts: the model's expert layers in model order (each with w1/b1/w2/b2 [E_local, ...]).
        hyper: AdamW constants.
    """

    def __init__(self, experts: Sequence, hyper: AdamWHyper):
        self.hyper = hyper
        self.layers = [[ge.w1, ge.b1, ge.w2, ge.b2] for ge in experts]
        self.num_local = experts[0].num_experts if experts else 0
        # np.full writes every zero (np.zeros maps zero pages lazily): every moment is resident from
        # the start, as once training has visited every expert, and no step pays first-touch faults
        self.m = [[np.full(p.shape, 0.0, dtype=np.float32) for p in ps] for ps in self.layers]
        self.v = [[np.full(p.shape, 0.0, dtype=np.float32) for p in ps] for ps in self.layers]
        self.t = 0
        self._active: list[np.ndarray] | None = None
        self.stats = StorageStats()

    def param_ids(self) -> set[int]:
        return {id(p) for ps in self.layers for p in ps}

    def after_backward(self) -> None:
        pass

    def set_active(self, kept_local: Sequence[np.ndarray]) -> None:
        """Activity of this step: ``kept_local[layer]`` [E_local] = rows kept for each local
        expert, summed over the micro-batches and over every rank that routes to it."""
        if len(kept_local) != len(self.layers):
            raise ValueError(f"activity for {len(kept_local)} MoE layers, the model has {len(self.layers)}")
        self._active = [np.flatnonzero(np.asarray(k) > 0) for k in kept_local]

    def _grads(self, ps: list) -> list[np.ndarray | None]:
        return [None if p.grad is None else tensor_view(p.grad) for p in ps]

    def sq_norm(self) -> float:
        if self._active is None:
            raise RuntimeError("set_active() must be called before sq_norm() in a lazy expert step")
        total = 0.0
        for ps, act in zip(self.layers, self._active):
            gs = self._grads(ps)
            for e in act:
                for g in gs:
                    total += sq_sum(None if g is None else g[e])
        return total

    @paddle.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        if self._active is None:
            raise RuntimeError("set_active() must be called before step() in a lazy expert step")
        self.t += 1
        s = step_scalars(self.hyper, lr, self.t, grad_scale)
        for li, (ps, act) in enumerate(zip(self.layers, self._active)):
            gs = self._grads(ps)
            views = [tensor_view(p) for p in ps]
            for e in act:
                for k, g in enumerate(gs):
                    adamw_update_(views[k][e], self.m[li][k][e], self.v[li][k][e], None if g is None else g[e], s, decay=True)
        self.stats.add(steps=1, touched_experts=sum(len(act) for act in self._active))
        self._active = None

    def discard(self) -> None:
        self._active = None

    def clear_grad(self) -> None:
        for p in (p for ps in self.layers for p in ps):
            p.clear_gradient(False)

    def interval_scalars(self) -> dict[str, float]:
        return {"alpha": self.stats.interval(len(self.layers) * self.num_local)["alpha"]}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, paddle.Tensor]:
        """Accumulators keyed like Paddle's (``<tensor name>_moment1_0`` ...), so checkpoints
        reshard them like any expert optimizer state."""
        out: dict[str, paddle.Tensor] = {}
        for li, ps in enumerate(self.layers):
            for k, p in enumerate(ps):
                out[f"{p.name}_{_ACCS[0]}"] = paddle.to_tensor(self.m[li][k])
                out[f"{p.name}_{_ACCS[1]}"] = paddle.to_tensor(self.v[li][k])
                out[f"{p.name}_{_STEP_ACC}"] = paddle.to_tensor(np.array([self.t], dtype=np.int64))
        return out

    def load_state_dict(self, state: dict) -> None:
        steps = set()
        for li, ps in enumerate(self.layers):
            for k, p in enumerate(ps):
                for acc, store in zip(_ACCS, (self.m, self.v)):
                    key = f"{p.name}_{acc}"
                    if key in state:
                        arr = np.asarray(state[key].numpy() if hasattr(state[key], "numpy") else state[key], dtype=np.float32)
                        if arr.shape != store[li][k].shape:
                            raise ValueError(f"optimizer state {key}: shape {list(arr.shape)} != parameter {list(store[li][k].shape)}")
                        store[li][k][...] = arr
                key = f"{p.name}_{_STEP_ACC}"
                if key in state:
                    steps.add(int(np.asarray(state[key].numpy() if hasattr(state[key], "numpy") else state[key]).reshape(-1)[0]))
                elif f"{p.name}_beta1_pow_acc_0" in state:  # a checkpoint of the dense (Paddle AdamW) update
                    b1pow = float(np.asarray(state[f"{p.name}_beta1_pow_acc_0"].numpy()).reshape(-1)[0])
                    steps.add(max(int(round(math.log(b1pow) / math.log(self.hyper.beta1))) - 1, 0) if self.hyper.beta1 > 0 else 0)
        if len(steps) > 1:
            raise ValueError(f"lazy expert optimizer state has inconsistent step counts {sorted(steps)}")
        if steps:
            self.t = steps.pop()


def clip_grad_norm_lazy_(
    params: Iterable[paddle.Tensor],
    updater: LazyExpertUpdater,
    max_norm: float,
    topology: Topology,
    communicator: Communicator | None = None,
    eps: float = 1e-6,
) -> tuple[float, float]:
    """Global gradient norm with lazily updated experts; clips dense/gate (and other owned)
    gradients in place and returns ``(norm, coef)``; ``coef`` (<= 1) is for the expert update.

    The squared-norm parts (float64, see the module docstring) go through the project's one
    clipping rule, :func:`~paddle_semoe.comm.fusion.clip_by_global_norm_`: collective over the
    EP group, like :func:`~paddle_semoe.comm.fusion.clip_grad_norm_`.
    """
    skip = updater.param_ids()
    shared = expert = 0.0
    grads = []
    for p in params:
        if p.stop_gradient or id(p) in skip or p.grad is None:
            continue
        sq = sq_sum(tensor_view(p.grad))
        if param_class(p) == "expert":
            expert += sq
        else:
            shared += sq
        grads.append(p.grad)
    expert += updater.sq_norm()
    return clip_by_global_norm_(grads, shared, expert, max_norm, communicator, topology.ep_group, eps)
