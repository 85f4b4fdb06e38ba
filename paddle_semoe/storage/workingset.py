"""The device working set: a bounded arena for the compute copies of activated experts.

An MoE layer's forward asks for the stacks ``w1 [A, D, F]``, ``b1 [A, F]``, ``w2 [A, F, D]``,
``b2 [A, D]`` of its ``A`` activated local experts; they are carved out of one pre-reserved
anonymous mapping (bump allocation, 64-byte aligned) and handed to Paddle without a copy
(DLPack). The grouped-FFN op keeps them until its backward, so the arena is reset after the
backward of a micro-batch (or right after the op when no gradient is needed).

On a GPU this is device memory filled by a copy stream; on CPU it is host memory, and its size
(``storage.working_set_mb``) bounds what one micro-batch may activate. A request that does not
fit is served from ordinary memory with one loud warning and counted as overflow.
"""

from __future__ import annotations

import itertools
import logging
import mmap
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

_ALIGN = 64


class WorkingSetArena:
    """Bump allocator of float32 arrays inside a fixed mapping.

    Args:
        capacity_bytes: size of the arena (0: every request overflows).
    """

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity = int(capacity_bytes)
        self._map = mmap.mmap(-1, max(self.capacity, mmap.PAGESIZE))
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self.used = 0
        self.overflow_bytes = 0  # live overflow allocations (dropped at reset)
        self._overflow: list[np.ndarray] = []
        self._warned = False

    def alloc(self, shapes: Sequence[Sequence[int]], what: str = "") -> list[np.ndarray]:
        """Contiguous float32 arrays of the given shapes (uninitialized)."""
        sizes = [int(np.prod(s)) * 4 for s in shapes]
        padded = [(n + _ALIGN - 1) // _ALIGN * _ALIGN for n in sizes]
        need = sum(padded)
        if self.used + need > self.capacity:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "\n%s\nworking set full: %s needs %.1f MiB, %.1f of %.1f MiB in use; FALLING BACK to ordinary "
                    "memory for what does not fit (raise storage.working_set_mb; tools/plan.py sizes it)\n%s",
                    "!" * 78, what or "a layer", need / 2**20, self.used / 2**20, self.capacity / 2**20, "!" * 78,
                )
            out = [np.empty(tuple(s), dtype=np.float32) for s in shapes]
            self._overflow.extend(out)
            self.overflow_bytes += sum(sizes)
            return out
        out = []
        for shape, n, start in zip(shapes, sizes, itertools.accumulate(padded, initial=self.used)):
            out.append(self._bytes[start : start + n].view(np.float32).reshape(tuple(shape)))
        self.used += need
        return out

    def mark(self) -> tuple[int, int]:
        return self.used, len(self._overflow)

    def reset(self, mark: tuple[int, int] = (0, 0)) -> None:
        """Free everything allocated after ``mark`` (default: everything)."""
        self.used, n_over = mark
        self.overflow_bytes -= sum(a.nbytes for a in self._overflow[n_over:])
        del self._overflow[n_over:]
