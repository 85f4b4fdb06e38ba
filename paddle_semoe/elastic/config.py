"""Typed config sections of an elastic multi-task job (loaded with :mod:`paddle_semoe.config`).

* ``tasks``: a list of :class:`TaskSpec` (name, batch size, loss weight, optional costs, and a
  ``kind`` that only the workload interprets);
* ``elastic``: :class:`ElasticConfig` (plan strategy, where task costs come from, sync);
* ``train``: :class:`ElasticRunConfig` (steps, checkpoints, resume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from paddle_semoe.elastic.cost import COST_SOURCES
from paddle_semoe.elastic.planner import PLAN_STRATEGIES

__all__ = ["ElasticConfig", "ElasticRunConfig", "TaskSpec", "check_tasks"]


@dataclass(frozen=True)
class TaskSpec:
    """One task of the job.

    ``per_sample_cost`` / ``overhead_cost`` (seconds, or any unit used consistently across
    tasks) are required when ``elastic.cost_source=config``.
    """

    name: str
    kind: str
    batch_size: int
    loss_weight: float = 1.0
    per_sample_cost: float | None = None
    overhead_cost: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"task name must be a non-empty identifier (letters, digits, _), got {self.name!r}")
        if self.batch_size < 1:
            raise ValueError(f"task {self.name!r}: batch_size must be >= 1, got {self.batch_size}")
        if not math.isfinite(self.loss_weight) or self.loss_weight <= 0:
            raise ValueError(f"task {self.name!r}: loss_weight must be positive, got {self.loss_weight}")
        if self.per_sample_cost is not None and not self.per_sample_cost > 0:
            raise ValueError(f"task {self.name!r}: per_sample_cost must be positive, got {self.per_sample_cost}")
        if self.overhead_cost < 0:
            raise ValueError(f"task {self.name!r}: overhead_cost must be >= 0, got {self.overhead_cost}")


def check_tasks(tasks: list[TaskSpec] | tuple[TaskSpec, ...], cost_source: str) -> None:
    """Job-level checks of the task list (unique names, costs present when needed)."""
    if not tasks:
        raise ValueError("tasks: at least one task is needed")
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"tasks: duplicate task names {dup}")
    if cost_source == "config":
        missing = [t.name for t in tasks if t.per_sample_cost is None]
        if missing:
            raise ValueError(f"elastic.cost_source=config needs tasks[*].per_sample_cost; missing for {missing}")


@dataclass(frozen=True)
class ElasticConfig:
    """How ranks are assigned to tasks and how gradients travel.

    Attributes:
        plan: ``load_aware`` (default) or ``naive`` (one rank per task; the baseline).
        cost_source: ``profile`` (time each task on the ranks before planning), ``config``
            (tasks[*].per_sample_cost / overhead_cost) or ``flops`` (analytic FLOPs /
            ``assumed_flops_per_s``).
        profile_repeats, profile_warmup: timing repetitions of the profiling run.
        assumed_flops_per_s: device rate for ``cost_source=flops``.
        bucket_mb: cap of one fused gradient bucket.
        comm_timeout_s: watchdog bound per collective (Gloo has its own fixed 30 s timeout).
        verify_restore: after a resume, recompute the parameters' SHA-256 across ranks and
            refuse to train if it differs from the checkpoint's.
    """

    plan: str = "load_aware"
    cost_source: str = "profile"
    profile_repeats: int = 3
    profile_warmup: int = 1
    assumed_flops_per_s: float = 1.0e12
    bucket_mb: float = 4.0
    comm_timeout_s: float = 300.0
    verify_restore: bool = True

    def __post_init__(self) -> None:
        if self.plan not in PLAN_STRATEGIES:
            raise ValueError(f"plan must be one of {PLAN_STRATEGIES}, got {self.plan!r}")
        if self.cost_source not in COST_SOURCES:
            raise ValueError(f"cost_source must be one of {COST_SOURCES}, got {self.cost_source!r}")
        if self.profile_repeats < 1 or self.profile_warmup < 0:
            raise ValueError("profile_repeats >= 1 and profile_warmup >= 0 required")
        if self.assumed_flops_per_s <= 0 or self.bucket_mb <= 0 or self.comm_timeout_s <= 0:
            raise ValueError("assumed_flops_per_s, bucket_mb and comm_timeout_s must be positive")


@dataclass(frozen=True)
class ElasticRunConfig:
    """The training run.

    ``stop_after``: end the job after this step with a checkpoint, as if it had been stopped
    there (e.g. to relaunch it on another number of ranks); the learning-rate schedule still
    spans ``max_steps``, so the resumed job continues the same curve.

    ``resume``: ``auto`` (default: the latest checkpoint in ``<output_dir>/checkpoints`` if
    any, else a fresh start; what a restarted or resized job needs), ``none`` (fresh; refuses
    to overwrite existing checkpoints), or a checkpoint path.
    """

    max_steps: int = 200
    seed: int = 42
    output_dir: str = "outputs/ufo"
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 50  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    resume: str = "auto"
    stop_after: int | None = None  # leave (with a checkpoint) after this step; the LR schedule still spans max_steps

    def __post_init__(self) -> None:
        if self.stop_after is not None and not 0 < self.stop_after <= self.max_steps:
            raise ValueError(f"stop_after must be in [1, max_steps={self.max_steps}], got {self.stop_after}")
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.log_every <= 0 or self.eval_every <= 0:
            raise ValueError("log_every and eval_every must be positive")
        if self.save_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("save_every >= 0 and keep_checkpoints >= 1 required")
        if not self.resume:
            raise ValueError("resume must be 'auto', 'none' or a checkpoint path")
