"""Per-task cost per sample: from the config, from a FLOP count, or from a short profiling run.

The planner needs, per task, the cost of one sample and a fixed per-step overhead
(:class:`~paddle_semoe.elastic.planner.TaskLoad`). Three sources:

* ``config``: numbers written in the job config (e.g. measured on the target hardware);
* ``flops``: an analytic FLOP count per sample divided by an assumed rate (no overhead) -
  what a dry run on a machine without the target devices can do;
* ``profile``: time forward + backward of each task at two batch sizes on the ranks themselves
  and fit ``t(n) = overhead + per_sample * n`` (least squares over the repetitions).
  Every rank profiles at the same time (so the measurements see the same contention); the
  fitted numbers are averaged over ranks and then broadcast from rank 0, so every rank plans
  with bit-identical inputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["COST_SOURCES", "CostFit", "fit_linear_cost", "profile_task_costs"]

COST_SOURCES: tuple[str, ...] = ("profile", "config", "flops")
#: Smallest per-sample cost a fit may report (a noisy fit can come out <= 0), seconds.
MIN_PER_SAMPLE_S = 1e-7


@dataclass(frozen=True)
class CostFit:
    """``t(n) = overhead_s + per_sample_s * n`` for one task."""

    per_sample_s: float
    overhead_s: float


def fit_linear_cost(samples: Sequence[int], seconds: Sequence[float]) -> CostFit:
    """Least-squares line through ``(samples[i], seconds[i])``; needs two distinct sizes.

    The slope is floored at :data:`MIN_PER_SAMPLE_S` and the intercept at 0 (timing noise can
    push either negative; a negative cost means nothing to the planner).
    """
    n = np.asarray(samples, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    if n.shape != t.shape or n.ndim != 1 or n.size < 2:
        raise ValueError(f"need matching 1-D samples and seconds with >= 2 points, got {n.shape} and {t.shape}")
    if np.unique(n).size < 2:
        raise ValueError(f"need at least two distinct batch sizes to fit a line, got {sorted(set(n.tolist()))}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"timings must be finite, got {t.tolist()}")
    A = np.stack([np.ones_like(n), n], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(A, t, rcond=None)
    if slope < MIN_PER_SAMPLE_S:
        logger.warning("cost fit: slope %.3g s/sample <= 0 from %s -> %s; using the mean cost per sample", slope, n.tolist(), t.tolist())
        slope = max(float(np.sum(t) / np.sum(n)), MIN_PER_SAMPLE_S)
        intercept = 0.0
    return CostFit(per_sample_s=float(slope), overhead_s=float(max(intercept, 0.0)))


def profile_task_costs(
    run_task: Callable[[int, int], None],
    num_tasks: int,
    sizes: Callable[[int], tuple[int, int]],
    repeats: int = 3,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> list[CostFit]:
    """Time ``run_task(task, n)`` (one forward + backward of ``n`` samples of ``task``) at the
    two sizes ``sizes(task)`` and fit a line per task. Local: no communication.

    Measurements alternate between the two sizes so slow drift (other processes) hits both.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    fits = []
    for task in range(num_tasks):
        small, large = sizes(task)
        if small == large:
            raise ValueError(f"task {task}: profiling sizes must differ, got {small} and {large}")
        for _ in range(warmup):
            run_task(task, large)
        xs, ts = [], []
        for _ in range(repeats):
            for n in (small, large):
                t0 = clock()
                run_task(task, n)
                ts.append(clock() - t0)
                xs.append(n)
        fits.append(fit_linear_cost(xs, ts))
    return fits
