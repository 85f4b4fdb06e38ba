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
    "ws_overflow_bytes",
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
        out = {
            "hit_rate": d["hits"] / d["accesses"] if d["accesses"] else float("nan"),
            "optim_hit_rate": d["optim_hits"] / d["optim_accesses"] if d["optim_accesses"] else float("nan"),
            "alpha": d["touched_experts"] / (steps * num_local_experts_total) if num_local_experts_total else float("nan"),
            "ssd_read_bytes_per_step": d["ssd_read_bytes"] / steps,
            "ssd_write_bytes_per_step": d["ssd_write_bytes"] / steps,
            "h2d_bytes_per_step": d["h2d_bytes"] / steps,
            "prefetch_wait_s_per_step": d["wait_s"] / steps,
            "forward_wait_s_per_step": d["forward_wait_s"] / steps,
            "optim_wait_s_per_step": d["optim_wait_s"] / steps,
            "update_s_per_step": d["update_s"] / steps,
            "loads_per_step": d["loads"] / steps,
            "prefetch_loads_per_step": d["prefetch_loads"] / steps,
            "prefetch_accuracy": d["prefetch_used"] / d["prefetch_loads"] if d["prefetch_loads"] else float("nan"),
            "evictions_per_step": d["evictions"] / steps,
            "writebacks_per_step": d["writebacks"] / steps,
            "cleaned_per_step": d["cleaned"] / steps,
        }
        out.update(gauges)
        return out


__all__ = ["StorageStats"]
