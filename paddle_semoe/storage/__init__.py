"""Hierarchical storage of expert states with 2D prefetch (SE-MoE items 2-3).

Modules (one concept each):

* :mod:`~paddle_semoe.storage.config` -- the ``storage:`` config section;
* :mod:`~paddle_semoe.storage.adamw` -- the lazy expert AdamW (one numpy kernel for every path);
* :mod:`~paddle_semoe.storage.lazy` -- lazy update of resident experts, shared gradient clipping;
* :mod:`~paddle_semoe.storage.layout` -- byte layout of one expert state;
* :mod:`~paddle_semoe.storage.ssd` -- SSD tier: checksummed per-expert files, write-then-rename;
* :mod:`~paddle_semoe.storage.policy` -- LFU with decay;
* :mod:`~paddle_semoe.storage.cache` -- host tier: slot pool and the background I/O worker;
* :mod:`~paddle_semoe.storage.workingset` -- device working set (bounded arena);
* :mod:`~paddle_semoe.storage.predictor` -- which experts the next layer will use;
* :mod:`~paddle_semoe.storage.tiered` -- the store a training job uses (:class:`TieredExperts`);
* :mod:`~paddle_semoe.storage.dense_shard` -- horizontal prefetch of sharded dense parameters;
* :mod:`~paddle_semoe.storage.capacity` -- the per-machine capacity model (``tools/plan.py``);
* :mod:`~paddle_semoe.storage.stats` -- counters for the metrics log.

Importing this package is cheap; submodules load on first use.
"""

from __future__ import annotations

import importlib

from paddle_semoe.storage.config import StorageConfig

_LAZY = {
    "TieredExperts": "paddle_semoe.storage.tiered",
    "ResidentLazyExperts": "paddle_semoe.storage.lazy",
    "AdamWHyper": "paddle_semoe.storage.adamw",
    "LFUDecayPolicy": "paddle_semoe.storage.policy",
    "SSDTier": "paddle_semoe.storage.ssd",
    "StorageError": "paddle_semoe.storage.ssd",
}

__all__ = ["StorageConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paddle_semoe.storage' has no attribute {name!r}")
