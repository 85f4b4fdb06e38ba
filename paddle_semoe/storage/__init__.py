"""Hierarchical storage of expert states with 2D prefetch (SE-MoE items 2-3).

One concept per module: ``config`` (the ``storage:`` section), ``adamw`` (the lazy expert
AdamW), ``lazy`` (resident lazy update, shared clipping), ``layout`` (bytes of one expert state),
``ssd``, ``policy`` (LFU with decay), ``cache`` (host tier and its I/O worker), ``workingset``,
``predictor``, ``tiered`` (the store a training job uses), ``dense_shard`` (horizontal prefetch),
``capacity`` (``tools/plan.py``) and ``stats``; ``README.md`` beside them tells the whole design.
"""

from __future__ import annotations

import importlib

from paddle_semoe.storage.config import StorageConfig

# The public classes, imported on first use (importing this package stays cheap).
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
