"""Load-aware assignment of tasks to ranks (SE-MoE item 6: elastic training of unbalanced tasks).

A multi-task step processes ``B_t`` samples of every task ``t``. Each rank runs the shared
backbone for the samples it holds and the experts of the tasks it hosts; gradients are summed
at the end of the step, so the step lasts as long as the busiest rank. The cost model of one
rank ``r`` hosting ``n_{t,r}`` samples of each of its tasks is::

    busy(r) = sum over hosted t of (overhead_t + per_sample_t * n_{t,r})

(``per_sample_t * B_t`` is the task's *load*; ``overhead_t`` the fixed cost of running the
task at all, e.g. launching its kernels).

Plans:

* **naive**: one rank per task (task ``t`` on rank ``t mod W``): the paper's baseline. With
  batches 512/256/128/128 on 4 ranks the heavy task's rank is busy 4x longer than the light
  ones, which idle.
* **load-aware**: every task is either *heavy* (it gets ``k_t >= 1`` ranks of its own and its
  batch is split over them: data parallelism inside the task) or *light* (packed whole onto one
  of ``S`` shared ranks together with other light tasks). For each split into heavy and light
  tasks and each ``S``, the dedicated ranks are handed out greedily to the heavy task with the
  largest per-rank busy time (optimal for ``max_t busy_t(k_t)``), and light tasks are packed by
  longest-processing-time-first. The plan with the smallest predicted step time (max busy
  over ranks) wins; ties go to fewer task replicas (less task-parameter memory and sync),
  then to fewer ranks per light bin. Heavy tasks take consecutive ranks first, in task order.

Everything here is pure Python (no Paddle, no processes) so the choice can be unit-tested and
explained; :func:`explain_plan` renders the log lines.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "PLAN_STRATEGIES",
    "Plan",
    "Shard",
    "TaskLoad",
    "explain_plan",
    "make_plan",
    "plan_load_aware",
    "plan_naive",
    "split_evenly",
]

PLAN_STRATEGIES: tuple[str, ...] = ("load_aware", "naive")
#: Above this many tasks the light set is restricted to the lightest tasks (T+1 candidates
#: instead of 2^T); below it every subset is tried.
EXHAUSTIVE_MAX_TASKS = 10
_REL_TOL = 1e-9


@dataclass(frozen=True)
class TaskLoad:
    """One task as the planner sees it.

    Attributes:
        name: task name (logs, checkpoints).
        batch_size: samples of this task per optimizer step, summed over ranks.
        per_sample_s: cost of one sample (forward + backward), seconds or any consistent unit.
        overhead_s: fixed cost per step of hosting the task on a rank (same unit).
    """

    name: str
    batch_size: int
    per_sample_s: float
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("task name must not be empty")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"task {self.name!r}: batch_size must be a positive int, got {self.batch_size!r}")
        if not math.isfinite(self.per_sample_s) or self.per_sample_s <= 0:
            raise ValueError(f"task {self.name!r}: per_sample_s must be positive and finite, got {self.per_sample_s!r}")
        if not math.isfinite(self.overhead_s) or self.overhead_s < 0:
            raise ValueError(f"task {self.name!r}: overhead_s must be >= 0 and finite, got {self.overhead_s!r}")

    @property
    def load(self) -> float:
        """samples x cost per sample."""
        return self.batch_size * self.per_sample_s

    def busy(self, samples: int) -> float:
        """Predicted busy time of one rank running ``samples`` samples of this task."""
        return self.overhead_s + self.per_sample_s * samples if samples > 0 else 0.0


@dataclass(frozen=True)
class Shard:
    """Samples ``[start, start + count)`` of task ``task``'s global batch run on rank ``rank``."""

    task: int
    rank: int
    start: int
    count: int


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` sizes differing by at most one, larger first."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    q, rem = divmod(total, parts)
    return [q + 1 if i < rem else q for i in range(parts)]


@dataclass(frozen=True)
class Plan:
    """Which rank runs which samples of which task.

    Attributes:
        world_size: W.
        tasks: the tasks, in config order (task index = position).
        shards: every (task, rank) slice; each task's slices tile its batch exactly.
        strategy: ``"load_aware"`` or ``"naive"``.
    """

    world_size: int
    tasks: tuple[TaskLoad, ...]
    shards: tuple[Shard, ...]
    strategy: str
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.strategy not in PLAN_STRATEGIES:
            raise ValueError(f"strategy must be one of {PLAN_STRATEGIES}, got {self.strategy!r}")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for s in self.shards:
            if not 0 <= s.task < len(self.tasks):
                raise ValueError(f"shard {s} names task {s.task}; there are {len(self.tasks)} tasks")
            if not 0 <= s.rank < self.world_size:
                raise ValueError(f"shard {s} names rank {s.rank}; world_size is {self.world_size}")
            if s.count < 1:
                raise ValueError(f"shard {s} is empty")
        for t, task in enumerate(self.tasks):
            mine = sorted((s for s in self.shards if s.task == t), key=lambda s: s.start)
            if not mine:
                raise ValueError(f"task {task.name!r} is assigned to no rank")
            pos = 0
            for s in mine:
                if s.start != pos:
                    raise ValueError(f"task {task.name!r}: shards do not tile its batch (gap or overlap at sample {pos})")
                pos += s.count
            if pos != task.batch_size:
                raise ValueError(f"task {task.name!r}: shards cover {pos} samples, batch_size is {task.batch_size}")
            ranks = [s.rank for s in mine]
            if len(set(ranks)) != len(ranks):
                raise ValueError(f"task {task.name!r} has two shards on one rank: {ranks}")

    # ------------------------------------------------------------------ queries
    def task_ranks(self, task: int) -> tuple[int, ...]:
        """Ranks holding task ``task`` (its task group), ascending."""
        return tuple(sorted(s.rank for s in self.shards if s.task == task))

    def rank_tasks(self, rank: int) -> tuple[int, ...]:
        """Tasks hosted by ``rank``, ascending."""
        return tuple(sorted(s.task for s in self.shards if s.rank == rank))

    def shard(self, task: int, rank: int) -> Shard | None:
        return next((s for s in self.shards if s.task == task and s.rank == rank), None)

    def owner(self, task: int) -> int:
        """The rank that saves task ``task``'s parameters (first of its group)."""
        return self.task_ranks(task)[0]

    def busy(self) -> list[float]:
        """Predicted busy time of each rank for one step (cost model of the module docstring)."""
        return [sum(self.tasks[s.task].busy(s.count) for s in self.shards if s.rank == r)
                for r in range(self.world_size)]

    @property
    def step_time(self) -> float:
        """Predicted step time: the busiest rank (communication not modelled)."""
        return max(self.busy())

    def idle(self) -> list[float]:
        """Predicted idle time of each rank per step (waiting for the busiest)."""
        b = self.busy()
        return [max(b) - x for x in b]

    def describe_rank(self, rank: int) -> str:
        parts = [f"{self.tasks[s.task].name}[{s.start}:{s.start + s.count}]" for s in self.shards if s.rank == rank]
        return " + ".join(parts) if parts else "(nothing)"

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "strategy": self.strategy,
            "tasks": [asdict(t) for t in self.tasks],
            "shards": [asdict(s) for s in self.shards],
        }

    @staticmethod
    def from_dict(d: dict) -> "Plan":
        return Plan(
            world_size=int(d["world_size"]),
            tasks=tuple(TaskLoad(**t) for t in d["tasks"]),
            shards=tuple(Shard(**s) for s in d["shards"]),
            strategy=str(d["strategy"]),
        )


# ---------------------------------------------------------------------- strategies
def plan_naive(tasks: Sequence[TaskLoad], world_size: int) -> Plan:
    """One rank per task: task ``t`` runs whole on rank ``t mod W``.

    With ``W > T`` ranks ``T..W-1`` host nothing (they still join every collective).
    """
    tasks = tuple(tasks)
    _check_inputs(tasks, world_size)
    shards = tuple(Shard(t, t % world_size, 0, task.batch_size) for t, task in enumerate(tasks))
    notes: tuple[str, ...] = ()
    if world_size > len(tasks):
        notes = (f"naive plan: ranks {len(tasks)}..{world_size - 1} host no task",)
    return Plan(world_size, tasks, shards, "naive", notes)


def _heavy_busy(task: TaskLoad, k: int) -> float:
    return task.busy(math.ceil(task.batch_size / k))


def _allocate_dedicated(tasks: Sequence[TaskLoad], heavy: Sequence[int], ranks: int) -> dict[int, int] | None:
    """Give up to ``ranks`` dedicated ranks to the heavy tasks (each >= 1, at most its batch
    size; ranks nobody can use stay idle): greedily to the task whose per-rank busy time is
    largest (ties: lower index)."""
    if len(heavy) > ranks:
        return None
    k = {t: 1 for t in heavy}
    for _ in range(ranks - len(heavy)):
        candidates = [t for t in heavy if k[t] < tasks[t].batch_size]
        if not candidates:
            break  # more ranks than samples: the rest stay idle
        worst = max(candidates, key=lambda t: (_heavy_busy(tasks[t], k[t]), -t))
        k[worst] += 1
    return k


def _pack_light(tasks: Sequence[TaskLoad], light: Sequence[int], bins: int) -> list[list[int]]:
    """Longest-processing-time-first packing of whole light tasks onto ``bins`` ranks."""
    order = sorted(light, key=lambda t: (-tasks[t].busy(tasks[t].batch_size), t))
    packed: list[list[int]] = [[] for _ in range(bins)]
    load = [0.0] * bins
    for t in order:
        b = min(range(bins), key=lambda i: (load[i], i))
        packed[b].append(t)
        load[b] += tasks[t].busy(tasks[t].batch_size)
    return [sorted(p) for p in packed]


def _light_sets(tasks: Sequence[TaskLoad]) -> Iterable[tuple[int, ...]]:
    T = len(tasks)
    if T <= EXHAUSTIVE_MAX_TASKS:
        for n in range(T + 1):
            yield from itertools.combinations(range(T), n)
    else:  # the lightest tasks are the candidates for sharing
        by_load = sorted(range(T), key=lambda t: (tasks[t].load, t))
        for n in range(T + 1):
            yield tuple(sorted(by_load[:n]))


def plan_load_aware(tasks: Sequence[TaskLoad], world_size: int) -> Plan:
    """The load-aware plan (see the module docstring)."""
    tasks = tuple(tasks)
    _check_inputs(tasks, world_size)
    best: tuple[tuple[float, int, int], dict[int, int], list[list[int]]] | None = None
    for light in _light_sets(tasks):
        heavy = [t for t in range(len(tasks)) if t not in light]
        bin_counts = range(1, min(len(light), world_size - len(heavy)) + 1) if light else [0]
        for bins in bin_counts:
            dedicated = world_size - bins
            if not heavy and dedicated > 0:
                continue  # ranks with nothing to do: another split uses them
            k = _allocate_dedicated(tasks, heavy, dedicated)
            if k is None:  # fewer ranks than heavy tasks
                continue
            packed = _pack_light(tasks, light, bins)
            busy = [_heavy_busy(tasks[t], k[t]) for t in heavy]
            busy += [sum(tasks[t].busy(tasks[t].batch_size) for t in p) for p in packed]
            key = (max(busy), sum(k.values()) + len(light), max((len(p) for p in packed), default=0))
            if best is None or _better(key, best[0]):
                best = (key, k, packed)
    if best is None:
        raise ValueError(
            f"no load-aware plan for {len(tasks)} tasks on {world_size} ranks "
            "(every task needs at least one sample per rank it gets)"
        )
    _, k, packed = best
    shards: list[Shard] = []
    rank = 0
    for t in sorted(k):
        start = 0
        for n in split_evenly(tasks[t].batch_size, k[t]):
            shards.append(Shard(t, rank, start, n))
            start += n
            rank += 1
    shards += [Shard(t, rank + b, 0, tasks[t].batch_size) for b, p in enumerate(packed) for t in p]
    rank += len(packed)
    notes: tuple[str, ...] = ()
    if rank < world_size:
        notes = (f"ranks {rank}..{world_size - 1} host no task (more ranks than samples)",)
    return Plan(world_size, tasks, tuple(shards), "load_aware", notes)


def _better(a: tuple[float, int, int], b: tuple[float, int, int]) -> bool:
    if not math.isclose(a[0], b[0], rel_tol=_REL_TOL, abs_tol=0.0):
        return a[0] < b[0]
    return a[1:] < b[1:]


def _check_inputs(tasks: Sequence[TaskLoad], world_size: int) -> None:
    if not tasks:
        raise ValueError("a plan needs at least one task")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")


def make_plan(strategy: str, tasks: Sequence[TaskLoad], world_size: int) -> Plan:
    """Dispatch on ``strategy`` (one of :data:`PLAN_STRATEGIES`)."""
    if strategy == "load_aware":
        return plan_load_aware(tasks, world_size)
    if strategy == "naive":
        return plan_naive(tasks, world_size)
    raise ValueError(f"plan strategy must be one of {PLAN_STRATEGIES}, got {strategy!r}")


# ---------------------------------------------------------------------- explanation
def explain_plan(plan: Plan, baseline: Plan | None = None, cost_source: str = "") -> str:
    """Multi-line text: loads, the assignment, predicted busy/idle per rank, and the comparison
    with ``baseline`` (typically the naive plan). Times are printed in milliseconds."""
    tasks = plan.tasks
    total_load = sum(t.load for t in tasks)
    src = f" (costs: {cost_source})" if cost_source else ""
    lines = [f"elastic plan '{plan.strategy}' for {len(tasks)} tasks on {plan.world_size} ranks{src}"]
    lines.append("  task          batch  per-sample ms  overhead ms   load ms   share  ranks (samples)")
    for t, task in enumerate(tasks):
        placement = ", ".join(
            f"{s.rank}({s.count})" for s in sorted((s for s in plan.shards if s.task == t), key=lambda s: s.rank)
        )
        kind = "DP x%d" % len(plan.task_ranks(t)) if len(plan.task_ranks(t)) > 1 else (
            "shares its rank" if len(plan.rank_tasks(plan.task_ranks(t)[0])) > 1 else "own rank"
        )
        lines.append(
            f"  {task.name:<12} {task.batch_size:6d}  {task.per_sample_s * 1e3:13.4f}  {task.overhead_s * 1e3:11.3f}"
            f"  {task.load * 1e3:8.2f}  {task.load / total_load:6.1%}  {placement}  [{kind}]"
        )
    ideal = (total_load + sum(t.overhead_s for t in tasks)) / plan.world_size
    lines.append(f"  ideal busy per rank (total / W): {ideal * 1e3:.2f} ms")
    for name, p in (("chosen", plan), ("baseline", baseline)):
        if p is None:
            continue
        busy, idle = (", ".join(f"{x * 1e3:.2f}" for x in xs) for xs in (p.busy(), p.idle()))
        lines.append(f"  {name:<8} {p.strategy:<10} predicted busy ms [{busy}]  idle ms [{idle}]"
                     f"  step {p.step_time * 1e3:.2f} ms")
        lines += [f"      rank {r}: {p.describe_rank(r)}" for r in range(p.world_size)]
    if baseline is not None and plan.step_time > 0:
        gain = baseline.step_time / plan.step_time
        lines.append(
            f"  predicted: step {baseline.step_time * 1e3:.2f} -> {plan.step_time * 1e3:.2f} ms, "
            f"samples/s per rank x{gain:.2f} ({(gain - 1):+.0%}) against the {baseline.strategy} plan"
        )
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)
