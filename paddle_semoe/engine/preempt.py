"""Preemption: SIGTERM / SIGINT during training end in a checkpoint, not in lost work.

:class:`StopRequest` turns the signals into a flag. The training loop reads it at every step
boundary and all-reduces it (max over ranks), so every rank finishes the same step, the job
saves a checkpoint together, and the trainer raises :class:`Preempted`; the entry point exits
with :data:`~paddle_semoe.engine.launch_env.EXIT_PREEMPTED` (75). ``train.resume=auto`` then
continues exactly. A second Ctrl-C (SIGINT) while the flag is set stops at once
(``KeyboardInterrupt``, exit 130). ``paddle.distributed.launch`` answers its own SIGTERM/SIGINT
by sending SIGTERM to the workers and waiting 30 s before killing them: a step plus a save
must fit in that grace period.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["Preempted", "StopRequest"]


class Preempted(Exception):
    """Training stopped on a signal after saving ``checkpoint`` at ``step``."""

    def __init__(self, step: int, checkpoint: Path, signame: str):
        super().__init__(f"stopped by {signame} at step {step}: checkpoint {checkpoint} saved; "
                         "rerun with -o train.resume=auto to continue")
        self.step = step
        self.checkpoint = checkpoint
        self.signame = signame


class StopRequest:
    """A flag set by SIGTERM/SIGINT (install it on every rank, or on none)."""

    def __init__(self) -> None:
        self.signum = 0
        self._announced = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "-"

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> "StopRequest":
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Only set the flag; :meth:`announce` logs at the step boundary. Python may run this
        # handler at any bytecode boundary, so it does nothing that could fail or block there.
        # (The preemption crashes once blamed on a logging handler came from oneDNN's GEMM
        # kernels, which corrupt the heap when any signal lands in them: the compiled ops hold
        # signals around their GEMMs, custom_ops/include/semoe/signal_guard.h.)
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, no checkpoint
        if not self.signum:
            self.signum = signum

    def announce(self) -> None:
        """Log the request once (called at the step boundary that acts on it)."""
        if self.signum and not self._announced:
            self._announced = True
            logger.warning("%s: finishing this step on every rank, then saving a checkpoint and stopping", self.signame)
