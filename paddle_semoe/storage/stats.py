"""Counters of the expert storage, for the metrics log (VisualDL + metrics.jsonl).

Both threads add to them (the worker: SSD bytes, loads, evictions; the main thread: accesses,
hits, waits, working-set copies); :meth:`StorageStats.interval` returns the per-step averages
since the previous call and the totals, as flat scalars named for the ``storage/`` prefix.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

_COUNTERS = (
    "steps",
    "accesses",  # forward uses of an expert (one per activated expert per MoE layer forward)
    "hits",  # ... of which found in the host cache, usable at once
    "optim_accesses",
    "optim_hits",
    "loads",  # SSD -> host reads
    "prefetch_loads",  # ... started by a prediction
    "prefetch_used",  # ... later used (by a forward or the optimizer) before being evicted
    "prefetch_dropped",  # predictions not loaded (stale, or would displace a hotter entry)
    "evictions",
    "writebacks",  # host -> SSD writes
    "cleaned",  # ... of which idle-time write-backs of least-hit entries (eviction later costs no write)
    "ssd_read_bytes",
    "ssd_write_bytes",
    "h2d_bytes",  # host -> working-set copies
    "wait_s",  # main thread blocked on the storage (forward + optimizer)
    "forward_wait_s",
    "optim_wait_s",
    "io_read_s",
    "io_write_s",
    "h2d_s",
    "update_s",  # expert AdamW time
    "touched_experts",  # activated (layer, local expert) pairs, summed over steps
)


@dataclass
class StorageStats:
    """Thread-safe counters; ``gauges`` are set (not summed) by the owner."""

    values: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in _COUNTERS})
    last: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in _COUNTERS})
    gauges: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: float) -> None:
        with self._lock:
            for k, v in amounts.items():
                if k not in self.values:
                    raise KeyError(f"unknown storage counter {k!r}; known: {sorted(self.values)}")
                self.values[k] += v

    def set_gauges(self, **values: float) -> None:
        with self._lock:
            self.gauges.update(values)

    def totals(self) -> dict[str, float]:
        with self._lock:
            return dict(self.values)

    def interval(self, num_local_experts_total: int) -> dict[str, float]:
        """Per-step averages since the previous call (plus rates and gauges).

        Args:
            num_local_experts_total: local experts over all MoE layers (denominator of alpha).
        """
        with self._lock:
            cur = dict(self.values)
            d = {k: cur[k] - self.last[k] for k in cur}
            self.last = cur
            gauges = dict(self.gauges)
        steps = max(d["steps"], 1.0)

        def ratio(num: str, den: str) -> float:
            return d[num] / d[den] if d[den] else float("nan")

        def per_step(*names: str) -> dict[str, float]:
            return {f"{k}_per_step": d[k] / steps for k in names}

        return {
            "hit_rate": ratio("hits", "accesses"),
            "optim_hit_rate": ratio("optim_hits", "optim_accesses"),
            "alpha": d["touched_experts"] / (steps * num_local_experts_total) if num_local_experts_total else float("nan"),
            **per_step("ssd_read_bytes", "ssd_write_bytes", "h2d_bytes"),
            "prefetch_wait_s_per_step": d["wait_s"] / steps,
            **per_step("forward_wait_s", "optim_wait_s", "update_s", "loads", "prefetch_loads"),
            "prefetch_accuracy": ratio("prefetch_used", "prefetch_loads"),
            **per_step("evictions", "writebacks", "cleaned"),
            **gauges,
        }


__all__ = ["StorageStats"]
