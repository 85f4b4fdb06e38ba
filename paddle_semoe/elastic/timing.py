"""Per-rank busy and idle time of training steps.

Each rank times three phases of every step with a wall clock and a CPU clock:

* ``compute``: fetching its samples, forward and backward (busy);
* ``sync``: the gradient reduction and the global-norm all-reduce: waiting for the slowest
  rank *plus* moving the bytes;
* ``update``: clipping and the optimizer step (busy).

Idle time is the waiting part of ``sync``. The rank that arrives last at the reduction waits
for nobody, so its ``sync`` is the pure communication time; every rank's idle time is its
``sync`` minus the smallest ``sync`` of the step (:func:`idle_from_sync`). CPU time
(``time.thread_time``) counts only what the rank computed, which matters when ranks share
cores: it is the busy time the rank would need on a device of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PHASES", "StepTimer", "idle_from_sync", "summarize_steps"]

PHASES: tuple[str, ...] = ("compute", "sync", "update")
#: Columns of one step's row: wall and CPU seconds of each phase.
COLUMNS: tuple[str, ...] = tuple(f"{p}_{c}" for p in PHASES for c in ("wall", "cpu"))


@dataclass
class StepTimer:
    """Collects one row of :data:`COLUMNS` per step."""

    rows: list[list[float]] = field(default_factory=list)
    _current: dict[str, float] = field(default_factory=dict)
    _t: tuple[float, float] = (0.0, 0.0)

    def start_step(self) -> None:
        self._current = {}
        self._t = (time.perf_counter(), time.thread_time())

    def mark(self, phase: str) -> None:
        """End ``phase`` (which started at the previous mark or at :meth:`start_step`)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        now = (time.perf_counter(), time.thread_time())
        self._current[f"{phase}_wall"] = now[0] - self._t[0]
        self._current[f"{phase}_cpu"] = now[1] - self._t[1]
        self._t = now

    def end_step(self) -> None:
        self.rows.append([self._current.get(c, 0.0) for c in COLUMNS])

    def take(self) -> np.ndarray:
        """float64 [steps, len(COLUMNS)] since the last call; clears the buffer."""
        out = np.asarray(self.rows, dtype=np.float64).reshape(-1, len(COLUMNS))
        self.rows = []
        return out


def idle_from_sync(sync_RS: np.ndarray) -> np.ndarray:
    """[ranks, steps] wall seconds in the reduction -> idle seconds (minus the step's minimum)."""
    sync_RS = np.asarray(sync_RS, dtype=np.float64)
    if sync_RS.ndim != 2:
        raise ValueError(f"sync times must be [ranks, steps], got shape {sync_RS.shape}")
    return sync_RS - sync_RS.min(axis=0, keepdims=True)


def summarize_steps(rows_RSC: np.ndarray) -> dict[str, np.ndarray]:
    """Per-rank totals over the steps of ``rows[rank, step, column]`` (columns :data:`COLUMNS`).

    Returns ``busy_wall``, ``busy_cpu`` (compute + update), ``sync_wall``, ``idle_wall``,
    ``comm_wall`` (sync minus idle) and ``step_wall`` (the sum over steps of the slowest rank's
    step): float64 [ranks] each (``step_wall`` [1]).
    """
    rows = np.asarray(rows_RSC, dtype=np.float64)
    col = {c: i for i, c in enumerate(COLUMNS)}
    busy_wall = rows[..., col["compute_wall"]] + rows[..., col["update_wall"]]
    busy_cpu = rows[..., col["compute_cpu"]] + rows[..., col["update_cpu"]]
    sync = rows[..., col["sync_wall"]]
    idle = idle_from_sync(sync)
    step = (busy_wall + sync).max(axis=0)
    return {
        "busy_wall": busy_wall.sum(axis=1),
        "busy_cpu": busy_cpu.sum(axis=1),
        "sync_wall": sync.sum(axis=1),
        "idle_wall": idle.sum(axis=1),
        "comm_wall": (sync - idle).sum(axis=1),
        "step_wall": np.array([step.sum()]),
    }
