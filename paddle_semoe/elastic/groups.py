"""Process groups of an elastic plan: the world, and one group per task (its data-parallel
replicas).

Task groups are created with ``paddle.distributed.new_group`` through
:class:`~paddle_semoe.comm.gloo_groups.GlooGroupFactory` (on Gloo every group needs a private
rendezvous store, or overlapping groups hang with 4 processes). Creation is collective over
the world: every rank creates every multi-rank task group in task order, including groups it
is not in. One-rank groups need no handle. Two tasks placed on the same ranks share a handle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from paddle_semoe.comm.gloo_groups import GlooGroupFactory
from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.elastic.planner import Plan

logger = logging.getLogger(__name__)

__all__ = ["TaskGroups", "build_task_groups", "task_group_lists"]


def task_group_lists(plan: Plan) -> list[tuple[int, ...]]:
    """Ranks of every task's group, by task index (pure)."""
    return [plan.task_ranks(t) for t in range(len(plan.tasks))]


@dataclass(frozen=True)
class TaskGroups:
    """The groups of one rank.

    Attributes:
        rank: this process's global rank.
        world: all ranks (shared parameters are summed here); ``handle=None`` = Paddle's
            default group.
        tasks: per task index, the task's group when this rank hosts the task, else ``None``.
    """

    rank: int
    world: CommGroup
    tasks: tuple[CommGroup | None, ...]

    @staticmethod
    def from_handles(plan: Plan, rank: int, handles: Mapping[tuple[int, ...], Any] | None = None) -> "TaskGroups":
        """Assemble from backend handles keyed by rank tuple (missing -> ``None``: simulated)."""
        handles = handles or {}
        tasks = tuple(
            CommGroup(f"task:{task.name}", ranks, ranks.index(rank), handles.get(ranks))
            if rank in ranks else None
            for task, ranks in zip(plan.tasks, task_group_lists(plan))
        )
        world = CommGroup("world", tuple(range(plan.world_size)), rank, None)
        return TaskGroups(rank, world, tasks)

    def describe(self) -> str:
        mine = [g.describe() for g in self.tasks if g is not None]
        return f"rank {self.rank}: {self.world.describe()} " + " ".join(mine)


def build_task_groups(plan: Plan, factory: Any = None) -> TaskGroups:
    """Create the task groups of ``plan`` (collective: call on every rank, same plan)."""
    import paddle.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world != plan.world_size:
        raise ValueError(f"the plan is for {plan.world_size} ranks but {world} processes are running")
    handles: dict[tuple[int, ...], Any] = {}
    if world > 1:
        factory = GlooGroupFactory() if factory is None else factory
        for ranks in task_group_lists(plan):
            if len(ranks) > 1 and ranks not in handles and ranks != tuple(range(world)):
                handles[ranks] = factory.new_group(list(ranks))
    groups = TaskGroups.from_handles(plan, rank, handles)
    logger.info("elastic groups: %s", groups.describe())
    return groups
