"""The host cache's replacement policy: LFU with decay (SE-MoE section 3.2).

A hit table holds one counter per local expert (key ``layer * num_local + expert``). Every use
of an expert by a forward adds one hit, cached or not; every ``decay_every`` optimizer steps all
counters are multiplied by ``beta``, so a task that stopped being trained loses its place.
Eviction takes the least-hit candidate the cache offers (deterministic ties, :meth:`victim`); a
prefetch may only displace an entry with no more hits than the expert it brings in
(:meth:`may_displace`); a load somebody waits for displaces the least-hit entry regardless.

Pure bookkeeping: no I/O, no threads; the cache calls it under its lock.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


class LFUDecayPolicy:
    """Hit table with periodic decay and least-hit victim selection.

    Args:
        num_keys: number of local experts over all MoE layers.
        beta: decay factor in (0, 1] applied every ``decay_every`` ticks.
        decay_every: K, ticks (optimizer steps) between decays.
        threshold: occupancy watermark in (0, 1] for eviction ahead of need.
    """

    def __init__(self, num_keys: int, beta: float, decay_every: int, threshold: float = 1.0):
        if num_keys <= 0:
            raise ValueError(f"num_keys must be positive, got {num_keys}")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if decay_every < 1:
            raise ValueError(f"decay_every must be >= 1, got {decay_every}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.beta = beta
        self.decay_every = decay_every
        self.threshold = threshold
        self.hits = np.zeros(num_keys, dtype=np.float64)
        self.last_use = np.full(num_keys, -1, dtype=np.int64)
        self.ticks = 0
        self._clock = 0

    def record(self, keys: Iterable[int], n: float = 1.0) -> None:
        """Count one use of each key."""
        for k in keys:
            self._clock += 1
            self.hits[k] += n
            self.last_use[k] = self._clock

    def tick(self) -> bool:
        """One optimizer step passed; decays (and returns True) every ``decay_every`` ticks."""
        self.ticks += 1
        if self.ticks % self.decay_every == 0:
            self.hits *= self.beta
            return True
        return False

    def eviction_order(self, key: int) -> tuple:
        """Sort key of the eviction order: least hits, then least recently used, then lowest key."""
        return (self.hits[key], self.last_use[key], key)

    def victim(self, candidates: Iterable[int]) -> int | None:
        """The first candidate in :meth:`eviction_order`; None if there is none."""
        return min(candidates, key=self.eviction_order, default=None)

    def may_displace(self, incoming: int, victim: int) -> bool:
        """Whether a speculative load of ``incoming`` may evict ``victim``."""
        return self.hits[incoming] >= self.hits[victim]

    def over_watermark(self, used: int, capacity: int) -> bool:
        """True when more than ``threshold * capacity`` slots are in use."""
        return used > math.floor(self.threshold * capacity)
