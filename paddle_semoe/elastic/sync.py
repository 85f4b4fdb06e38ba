"""Gradient synchronization of an elastic multi-task job, and the loss scaling that makes it
exact for every plan.

Objective (plan-independent): ``L = sum_t w_t * mean_{i in batch_t} loss_i`` over the tasks'
global batches (``w_t`` = the task's loss weight). A rank holding ``n_{t,r}`` samples of task
``t`` computes the local objective ``L_r = sum_t (w_t / B_t) * sum_{i in shard_{t,r}} loss_i``
(:func:`sample_weight` is the factor), so ``L = sum_r L_r`` for *any* assignment. Hence:

* shared parameters (every rank holds them): gradient = **sum over all ranks**;
* task ``t``'s parameters (held by task ``t``'s ranks only; the others' gradient is 0):
  gradient = **sum over task t's group**.

Every rank then holds the gradient of the same global objective ``L``, whatever the plan, so
the optimizer steps are the same under the naive plan, the load-aware plan, or after a resize
(up to floating-point summation order).

Gradients are packed per entity (shared, task 0, task 1, ...) into buckets of at most
``bucket_bytes`` and reduced with one collective each; entities go in a fixed global order
(shared first, then tasks by index), which rules out cross-group deadlocks. Clipping uses the
global norm: shared gradients (equal everywhere) count once, task gradients once per task
(on the task's first rank), summed with one all-reduce over the world.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import paddle

from paddle_semoe.comm.fusion import all_reduce_grads_, clip_by_global_norm_, pack, squared_norm
from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.comm.transport import Communicator
from paddle_semoe.elastic.groups import TaskGroups
from paddle_semoe.elastic.planner import Plan
from paddle_semoe.params import SHARED, split_by_task

logger = logging.getLogger(__name__)

__all__ = ["ElasticGradSync", "SyncRule", "sample_weight", "sync_rules"]


def sample_weight(plan: Plan, task: int, loss_weight: float = 1.0) -> float:
    """Factor of each per-sample loss of ``task`` in a rank's local objective: ``w_t / B_t``."""
    return loss_weight / plan.tasks[task].batch_size


@dataclass(frozen=True)
class SyncRule:
    """Gradients of ``entity`` (``None`` = shared, else a task index) are summed over ``ranks``."""

    entity: int | None
    ranks: tuple[int, ...]


def sync_rules(plan: Plan, rank: int) -> list[SyncRule]:
    """The rules of the entities ``rank`` holds, in the global reduction order (pure)."""
    return [SyncRule(SHARED, tuple(range(plan.world_size)))] + [
        SyncRule(t, plan.task_ranks(t)) for t in plan.rank_tasks(rank)
    ]


@dataclass(frozen=True)
class _Bucket:
    entity: int | None
    group: CommGroup
    params: tuple[paddle.Tensor, ...]


class ElasticGradSync:
    """Sum gradients per the rules of the module docstring, in fused buckets.

    Args:
        named_params: the model's ``named_parameters()`` (tagged with
            :func:`~paddle_semoe.params.mark_task_params`).
        plan: the plan (decides which tasks this rank holds).
        groups: this rank's groups (:func:`~paddle_semoe.elastic.groups.build_task_groups`).
        communicator: the collectives (``make_communicator`` or a simulated one).
        bucket_bytes: cap of one bucket (a larger parameter gets a bucket of its own).
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, paddle.Tensor]],
        plan: Plan,
        groups: TaskGroups,
        communicator: Communicator | None,
        bucket_bytes: int = 4 << 20,
    ) -> None:
        self.plan = plan
        self.groups = groups
        self.comm = communicator
        by_task = split_by_task(named_params)
        hosted = set(plan.rank_tasks(groups.rank))
        stray = sorted(t for t in by_task if t is not None and t not in hosted)
        if stray:
            names = [plan.tasks[t].name for t in stray]
            raise ValueError(f"rank {groups.rank} holds parameters of tasks {names} that the plan does not place on it")
        self.buckets: list[_Bucket] = []
        for rule in sync_rules(plan, groups.rank):
            group = groups.world if rule.entity is None else groups.tasks[rule.entity]
            assert group is not None and group.ranks == rule.ranks
            for ps in pack([p for _, p in by_task.get(rule.entity, [])], bucket_bytes, lambda p: str(p.dtype)):
                self.buckets.append(_Bucket(rule.entity, group, tuple(ps)))
        self.params = [p for b in self.buckets for p in b.params]

    @paddle.no_grad()
    def reduce(self) -> None:
        """Sum every bucket over its group, in place (collective over the groups involved)."""
        for b in self.buckets:
            if b.group.size > 1:
                all_reduce_grads_(b.params, self.comm, b.group)

    @paddle.no_grad()
    def clip_(self, max_norm: float, eps: float = 1e-6) -> float:
        """Scale every gradient by ``min(1, max_norm / norm)`` (``math.inf``: measure only);
        returns the global norm before. Shared gradients count once, task gradients on the
        task's first rank, summed over the world (:func:`~paddle_semoe.comm.fusion.clip_by_global_norm_`)."""
        shared, owned = [], []
        for b in self.buckets:
            grads = [p.grad for p in b.params if p.grad is not None]
            if b.entity is None:
                shared += grads
            elif self.plan.owner(b.entity) == self.groups.rank:
                owned += grads
        grads = [p.grad for p in self.params if p.grad is not None]
        return clip_by_global_norm_(
            grads, squared_norm(shared), squared_norm(owned), max_norm, self.comm, self.groups.world, eps
        )[0]
