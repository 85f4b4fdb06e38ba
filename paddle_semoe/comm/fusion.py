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
from typing import Iterable, Sequence

import paddle

from paddle_semoe.comm.topology import CommGroup, Topology
from paddle_semoe.comm.transport import Communicator, make_communicator
from paddle_semoe.moe.params import PARAM_CLASSES, ParamClass, param_class

logger = logging.getLogger(__name__)

__all__ = [
    "CPU_BUCKET_BYTES",
    "GPU_BUCKET_BYTES",
    "Bucket",
    "GradientReducer",
    "ReductionRule",
    "build_buckets",
    "clip_grad_norm_",
    "default_bucket_bytes",
    "grad_or_zeros",
    "reduce_gradients_unfused",
    "reduction_rule",
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
    if cls == "dense":
        group = topology.dp_group
    elif cls == "gate":
        group = topology.gate_group
    elif cls == "expert":
        group = topology.expert_dp_group  # 1/ep for the EP sum, 1/edp for the replica mean
    else:
        raise ValueError(f"unknown parameter class {cls!r}; expected one of {PARAM_CLASSES}")
    return ReductionRule(cls, group if group.size > 1 else None, 1.0 / topology.world_size)


@dataclass(frozen=True)
class Bucket:
    """Parameters whose gradients travel together in one contiguous buffer."""

    param_class: ParamClass
    dtype: str
    params: tuple[paddle.Tensor, ...]
    numels: tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def nbytes(self) -> int:
        return self.numel * self.params[0].element_size()


def _trainable(params: Iterable[paddle.Tensor]) -> list[paddle.Tensor]:
    return [p for p in params if not p.stop_gradient]


def build_buckets(params: Sequence[paddle.Tensor], bucket_bytes: int) -> list[Bucket]:
    """Pack parameters into buckets in order, per (class, dtype); ``bucket_bytes`` caps each."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    open_: dict[tuple[str, str], list[paddle.Tensor]] = {}
    sizes: dict[tuple[str, str], int] = {}
    buckets: list[Bucket] = []

    def flush(key: tuple[str, str]) -> None:
        ps = open_.pop(key, [])
        sizes.pop(key, None)
        if ps:
            buckets.append(
                Bucket(key[0], key[1], tuple(ps), tuple(math.prod(p.shape) for p in ps))  # type: ignore[arg-type]
            )

    for p in _trainable(params):
        key = (param_class(p), str(p.dtype))
        nbytes = math.prod(p.shape) * p.element_size()
        if key in open_ and sizes[key] + nbytes > bucket_bytes:
            flush(key)
        open_.setdefault(key, []).append(p)
        sizes[key] = sizes.get(key, 0) + nbytes
    for key in list(open_):
        flush(key)
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
            if rule.group is None and rule.scale == 1.0:
                continue
            grads = [grad_or_zeros(p).reshape([-1]) for p in bucket.params]
            flat = grads[0] if len(grads) == 1 else paddle.concat(grads)
            flat = flat * rule.scale if rule.scale != 1.0 else flat.clone()
            if rule.group is not None:
                self.comm.all_reduce_(flat, rule.group)
            pieces = paddle.split(flat, list(bucket.numels)) if len(bucket.params) > 1 else [flat]
            for p, piece in zip(bucket.params, pieces):
                write_grad(p, piece)


@paddle.no_grad()
def reduce_gradients_unfused(
    params: Iterable[paddle.Tensor], topology: Topology, communicator: Communicator | None = None
) -> None:
    """Same semantics as :meth:`GradientReducer.reduce`, one collective per parameter."""
    comm = communicator or make_communicator("auto", rank=topology.rank)
    rules = {c: reduction_rule(c, topology) for c in PARAM_CLASSES}
    order = {c: i for i, c in enumerate(PARAM_CLASSES)}
    for p in sorted(_trainable(params), key=lambda q: order[param_class(q)]):
        rule = rules[param_class(p)]
        if rule.group is None and rule.scale == 1.0:
            continue
        g = grad_or_zeros(p) * rule.scale
        if rule.group is not None:
            comm.all_reduce_(g, rule.group)
        write_grad(p, g)


@paddle.no_grad()
def clip_grad_norm_(
    params: Iterable[paddle.Tensor],
    max_norm: float,
    topology: Topology,
    communicator: Communicator | None = None,
    eps: float = 1e-6,
) -> float:
    """Clip gradients by the global norm of the whole (expert-sharded) model, in place.

    Call after the gradient reduction. Dense and gate gradients are equal on every rank then,
    so their squared norms count once (locally); expert gradients differ across the EP group
    (each rank owns different experts), so their squared norms are summed over ``ep_group``
    (expert replicas across ``expert_dp_group`` are equal and count once). Collective over the
    EP group (every rank must call it). Returns the global norm before clipping.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    grads = [(param_class(p), p.grad) for p in _trainable(params) if p.grad is not None]
    shared = paddle.zeros([1], dtype="float32")
    expert = paddle.zeros([1], dtype="float32")
    for cls, g in grads:
        sq = paddle.sum(paddle.square(g.astype("float32"))).reshape([1])
        if cls == "expert":
            expert = expert + sq
        else:
            shared = shared + sq
    if topology.ep_group.size > 1:
        comm = communicator or make_communicator("auto", rank=topology.rank)
        comm.all_reduce_(expert, topology.ep_group)
    total = float(paddle.sqrt(shared + expert).item())
    coef = max_norm / (total + eps)
    if coef < 1.0:
        for _, g in grads:
            paddle.assign(g * coef, output=g)
    return total
