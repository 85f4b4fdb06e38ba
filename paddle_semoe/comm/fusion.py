"""Fusion communication of gradients by parameter class (SE-MoE item 4) and MoE-aware clipping.

Rules (``W`` ranks, ``ep`` = EP degree, ``edp = W / ep`` expert replicas; the loss of each rank
is the mean over its own tokens and the training objective is the mean over ranks):

* dense: all-reduced over ``dp_group`` (all ranks) -> mean over ranks ``sum_r g_r / W``.
* gate: gate parameters are replicated on every rank, so they are averaged over all ranks
  too: over ``topology.gate_group``, which is ``dp_group`` when ``edp > 1`` and ``ep_group``
  otherwise (then the EP group holds all ranks) -> ``sum_r g_r / W``.
* expert: never averaged across the EP group (each rank owns different experts). The
  exchange backward already delivers to the owner the *sum* over its EP group of the
  per-rank mean losses' gradients, so the owner scales by ``1/ep`` (gradient of the EP
  group's mean loss); replicas are then averaged over ``expert_dp_group`` when it has more
  than one rank -> ``sum_k g_k / (ep * edp)``.

Every class is therefore scaled by ``1/W`` and summed over its group. Gradients are packed
into contiguous buckets of at most ``bucket_bytes`` (one parameter larger than that gets a
bucket of its own; buckets never mix classes or dtypes), each bucket is scaled and
all-reduced with one collective and unpacked back into ``.grad``.
:func:`reduce_gradients_unfused` does the same per parameter (for comparison and debugging).

Every rank must hold the same parameter structure (same order, shapes, dtypes and classes),
which is the case for replicated dense/gate parameters and for per-rank expert shards of
equal shape. A parameter without a gradient counts as zeros and receives the reduced value.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence

import paddle

from paddle_semoe import ops
from paddle_semoe.comm.topology import CommGroup, Topology
from paddle_semoe.comm.transport import Communicator, make_communicator
from paddle_semoe.params import PARAM_CLASSES, ParamClass, param_class

logger = logging.getLogger(__name__)

__all__ = [
    "CPU_BUCKET_BYTES",
    "GPU_BUCKET_BYTES",
    "Bucket",
    "GradientReducer",
    "all_reduce_grads_",
    "ReductionRule",
    "build_buckets",
    "clip_by_global_norm_",
    "clip_grad_norm_",
    "global_grad_norm",
    "default_bucket_bytes",
    "grad_or_zeros",
    "pack",
    "reduce_gradients_unfused",
    "reduction_rule",
    "squared_norm",
    "write_grad",
]

#: Bucket size of the released SE-MoE code (GPU).
GPU_BUCKET_BYTES = 256 << 20
#: CPU default: with Gloo, 4 MiB buckets reduced 32 MiB of gradients fastest among
#: 1..64 MiB with 2 and 4 processes (tools/bench_comm.py); larger buckets were slower.
CPU_BUCKET_BYTES = 4 << 20


def default_bucket_bytes() -> int:
    """256 MiB when Paddle runs on a GPU, else 4 MiB."""
    try:
        on_gpu = paddle.is_compiled_with_cuda() and "gpu" in str(paddle.get_device())
    except Exception:  # noqa: BLE001 - device query is best effort
        on_gpu = False
    return GPU_BUCKET_BYTES if on_gpu else CPU_BUCKET_BYTES


@dataclass(frozen=True)
class ReductionRule:
    """How one parameter class is reduced: ``g <- sum over group of (scale * g)``.

    ``group`` is ``None`` when no communication is needed (one-rank group).
    """

    param_class: ParamClass
    group: CommGroup | None
    scale: float


def reduction_rule(cls: ParamClass, topology: Topology) -> ReductionRule:
    """The rule of one class (see the module table)."""
    # expert: 1/ep for the EP sum, 1/edp for the replica mean, both in the 1/W scale
    groups = {"dense": topology.dp_group, "gate": topology.gate_group,
              "expert": topology.expert_dp_group}
    if cls not in groups:
        raise ValueError(f"unknown parameter class {cls!r}; expected one of {PARAM_CLASSES}")
    group = groups[cls]
    return ReductionRule(cls, group if group.size > 1 else None, 1.0 / topology.world_size)


@dataclass(frozen=True)
class Bucket:
    """Parameters whose gradients travel together in one contiguous buffer."""

    param_class: ParamClass
    dtype: str
    params: tuple[paddle.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(p.shape) for p in self.params) * self.params[0].element_size()


def _trainable(params: Iterable[paddle.Tensor]) -> list[paddle.Tensor]:
    return [p for p in params if not p.stop_gradient]


def pack(params: Sequence[paddle.Tensor], cap_bytes: int, key: Callable[[paddle.Tensor], Hashable]) -> list[list[paddle.Tensor]]:
    """Greedy buckets in parameter order, one open bucket per ``key`` (class, dtype, ...); a
    bucket closes when the next parameter would pass ``cap_bytes`` (a larger one gets its own)."""
    if cap_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {cap_bytes}")
    open_: dict[Hashable, tuple[list[paddle.Tensor], int]] = {}
    out: list[list[paddle.Tensor]] = []
    for p in params:
        k, nbytes = key(p), math.prod(p.shape) * p.element_size()
        ps, size = open_.get(k, ([], 0))
        if ps and size + nbytes > cap_bytes:
            out.append(ps)
            ps, size = [], 0
        open_[k] = (ps + [p], size + nbytes)
    return out + [ps for ps, _ in open_.values()]


def build_buckets(params: Sequence[paddle.Tensor], bucket_bytes: int) -> list[Bucket]:
    """Pack parameters into buckets in order, per (class, dtype); ``bucket_bytes`` caps each."""
    groups = pack(_trainable(params), bucket_bytes, lambda p: (param_class(p), str(p.dtype)))
    buckets = [Bucket(param_class(ps[0]), str(ps[0].dtype), tuple(ps)) for ps in groups]
    # a deterministic order that every rank shares: by class, then first appearance
    order = {c: i for i, c in enumerate(PARAM_CLASSES)}
    buckets.sort(key=lambda b: order[b.param_class])
    return buckets


def grad_or_zeros(p: paddle.Tensor) -> paddle.Tensor:
    """``p.grad``, or zeros of ``p``'s shape when it has none (a parameter no token reached)."""
    return p.grad if p.grad is not None else paddle.zeros(p.shape, dtype=p.dtype)


def write_grad(p: paddle.Tensor, value: paddle.Tensor) -> None:
    """Store ``value`` (any shape with ``p``'s size) as ``p.grad``, in place when it exists."""
    value = value.reshape(p.shape)
    if p.grad is None:
        p.grad = value
    else:
        paddle.assign(value, output=p.grad)


@paddle.no_grad()
def all_reduce_grads_(
    params: Sequence[paddle.Tensor], comm: Communicator | None, group: CommGroup | None, scale: float = 1.0
) -> None:
    """``g <- sum over group of (scale * g)`` for the gradients of ``params``, packed into one
    contiguous buffer and one collective; a missing gradient counts as zeros."""
    grads = [grad_or_zeros(p).reshape([-1]) for p in params]
    flat = paddle.concat(grads) if len(grads) > 1 else grads[0]
    flat = flat * scale if scale != 1.0 else flat.clone()
    if comm is not None and group is not None and group.size > 1:
        comm.all_reduce_(flat, group)
    pieces = paddle.split(flat, [math.prod(p.shape) for p in params]) if len(params) > 1 else [flat]
    for p, piece in zip(params, pieces):
        write_grad(p, piece)


class GradientReducer:
    """Fused, class-aware gradient reduction (see the module docstring for the rules).

    Args:
        params: the model's parameters (``model.parameters()``); frozen ones are skipped.
        topology: process groups.
        communicator: collectives (default: ``make_communicator("auto")``).
        bucket_bytes: cap of one bucket; default :func:`default_bucket_bytes`.

    Call :meth:`reduce` after ``loss.backward()`` and before clipping / ``optimizer.step()``.
    """

    def __init__(
        self,
        params: Iterable[paddle.Tensor],
        topology: Topology,
        communicator: Communicator | None = None,
        bucket_bytes: int | None = None,
    ) -> None:
        self.topology = topology
        self.comm = communicator or make_communicator("auto", rank=topology.rank)
        self.bucket_bytes = bucket_bytes or default_bucket_bytes()
        self.buckets = build_buckets(list(params), self.bucket_bytes)
        self.rules = {c: reduction_rule(c, topology) for c in PARAM_CLASSES}
        logger.debug(
            "gradient buckets: %s",
            [(b.param_class, b.dtype, len(b.params), b.nbytes) for b in self.buckets],
        )

    @paddle.no_grad()
    def reduce(self) -> None:
        """Reduce every bucket in place (collective over the groups of the classes)."""
        for bucket in self.buckets:
            rule = self.rules[bucket.param_class]
            if rule.group is not None or rule.scale != 1.0:
                all_reduce_grads_(bucket.params, self.comm, rule.group, rule.scale)


def reduce_gradients_unfused(
    params: Iterable[paddle.Tensor], topology: Topology, communicator: Communicator | None = None
) -> None:
    """Same semantics as :meth:`GradientReducer.reduce`, one collective per parameter (buckets
    of one byte hold one parameter each)."""
    GradientReducer(params, topology, communicator, bucket_bytes=1).reduce()


def squared_norm(grads: Iterable[paddle.Tensor]) -> paddle.Tensor:
    """float32 [1]: the sum of squares of ``grads`` (one multi-tensor kernel call on CPU,
    :func:`paddle_semoe.ops.squared_norms`; Paddle ops elsewhere, no host sync on a GPU)."""
    gs = list(grads)
    if not gs:
        return paddle.zeros([1], dtype="float32")
    return paddle.sum(ops.squared_norms(gs)).reshape([1])


@paddle.no_grad()
def clip_by_global_norm_(
    grads: Sequence[paddle.Tensor],
    local_sq: float | paddle.Tensor,
    summed_sq: float | paddle.Tensor,
    max_norm: float,
    communicator: Communicator | None = None,
    group: CommGroup | None = None,
    eps: float = 1e-6,
    in_place: bool = True,
) -> tuple[float, float]:
    """The project's one clipping rule: scale ``grads`` in place by ``coef = min(1, max_norm /
    (norm + eps))``, ``norm = sqrt(local_sq + sum over group of summed_sq)``. With
    ``in_place=False`` the gradients are left as they are and the caller applies ``coef``
    (e.g. folded into the optimizer's update: ``optimizer.step(grad_scale=coef)``).

    A squared gradient norm has a part every member of ``group`` holds identically (dense and
    gate gradients after the reduction, shared multi-task parameters), counted once
    (``local_sq``), and a part that differs per member (expert shards, task parameters on their
    owner), summed over ``group`` (``summed_sq``; collective when the group has several members).
    Both are host floats or one-element tensors; ``max_norm=math.inf`` only measures.
    Returns ``(norm before clipping, coef)``, equal on every member.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    summed = float(summed_sq.item()) if isinstance(summed_sq, paddle.Tensor) else float(summed_sq)
    local = float(local_sq.item()) if isinstance(local_sq, paddle.Tensor) else float(local_sq)
    if group is not None and group.size > 1:
        comm = communicator or make_communicator("auto", rank=group.global_rank)
        summed = float(comm.all_reduce([summed], group, what="squared gradient norm")[0])
    total = math.sqrt(local + summed)
    coef = max_norm / (total + eps)
    if coef < 1.0 and in_place:
        for g in grads:
            paddle.assign(g * coef, output=g)
    return total, min(coef, 1.0)


def clip_grad_norm_(
    params: Iterable[paddle.Tensor],
    max_norm: float,
    topology: Topology,
    communicator: Communicator | None = None,
    eps: float = 1e-6,
) -> float:
    """Clip gradients by the global norm of the whole (expert-sharded) model, in place.
    Returns the global norm before clipping. See :func:`global_grad_norm`."""
    return global_grad_norm(params, max_norm, topology, communicator, eps, clip=True)[0]


def global_grad_norm(
    params: Iterable[paddle.Tensor],
    max_norm: float,
    topology: Topology,
    communicator: Communicator | None = None,
    eps: float = 1e-6,
    clip: bool = False,
) -> tuple[float, float]:
    """The global gradient norm of the whole (expert-sharded) model and its clip coefficient
    (:func:`clip_by_global_norm_`); the gradients are scaled in place only with ``clip``.

    Call after the gradient reduction: dense and gate gradients are then equal on every rank
    and count once; expert gradients differ across the EP group and are summed over
    ``ep_group`` (replicas across ``expert_dp_group`` count once). Collective over the EP group.
    Returns ``(norm before clipping, coef)``.
    """
    grads = [(param_class(p), p.grad) for p in _trainable(params) if p.grad is not None]
    shared = squared_norm(g for c, g in grads if c != "expert")
    expert = squared_norm(g for c, g in grads if c == "expert")
    return clip_by_global_norm_([g for _, g in grads], shared, expert, max_norm, communicator, topology.ep_group, eps,
                                in_place=clip)
