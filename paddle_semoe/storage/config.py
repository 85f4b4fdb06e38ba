"""The ``storage:`` section of the training config: hierarchical storage of expert states.

Off by default. When ``enabled``, every local expert's fp32 master weights and AdamW moments
live in per-expert files on SSD (``dir``); a host-memory cache of ``host_cache_mb`` holds the
frequently used ones (LFU with decay: hits are multiplied by ``lfu_beta`` every
``lfu_decay_every`` optimizer steps, and the least-hit unpinned entry is evicted, written back
first when dirty); a bounded working set of ``working_set_mb`` holds the compute copies of the
experts the MoE layers activate. A background worker prefetches what the next layer will use
and writes back evicted entries. Dense parameters stay resident.

Tiered storage needs the lazy expert update (``optim.expert_update: lazy``): an expert that got
no tokens in a step is not touched that step, so a step only reads and writes the activated
experts' states. See :mod:`paddle_semoe.storage`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StorageConfig:
    """Hierarchical expert storage (SE-MoE items 2-3).

    Attributes:
        enabled: keep expert states in the three tiers instead of resident parameters.
        dir: SSD tier directory (one subdirectory per rank); ``None``: ``<output_dir>/expert_store``.
        host_cache_mb: host tier capacity in MiB (whole expert states: master + 2 moments).
        working_set_mb: device working-set arena in MiB (compute copies of the activated
            experts of the MoE layers of one micro-batch, from forward until backward).
        lfu_beta: hit-count decay factor in (0, 1].
        lfu_decay_every: K, optimizer steps between two decays.
        evict_threshold: occupancy watermark in (0, 1]; when the cache is fuller than
            ``evict_threshold * capacity`` the worker evicts least-hit entries (writing dirty
            ones back) while it is idle, so prefetches find a free slot without waiting on a write.
        clean_ahead: fraction of the cache, least-hit entries first, that the worker keeps clean
            by writing dirty entries back while idle (0: off): the entries a miss will evict then
            need no write, so the miss waits for a read only.
        writeback_every: optimizer steps between write-backs of all dirty entries (0: only on
            eviction and at checkpoints).
        prefetch: background vertical prefetch (off: every load happens on demand).
        prefetch_min_score: co-activation probability above which an expert of the next layer
            is prefetched.
        o_direct: read and write expert files with O_DIRECT (no page cache); off: buffered I/O
            followed by ``posix_fadvise(DONTNEED)``.
        fsync: fsync each written file and its directory before it replaces the old one.
        verify_reads: check the CRC-32 of every expert state read from SSD.
        shard_dense: horizontal prefetch: shard each block's dense parameters over the
            sharding group (stage-3 style) and all-gather the next block's while one computes.
    """

    enabled: bool = False
    dir: str | None = None
    host_cache_mb: float = 1024.0
    working_set_mb: float = 256.0
    lfu_beta: float = 0.5
    lfu_decay_every: int = 10
    evict_threshold: float = 0.9
    clean_ahead: float = 0.25
    writeback_every: int = 0
    prefetch: bool = True
    prefetch_min_score: float = 0.25
    o_direct: bool = True
    fsync: bool = True
    verify_reads: bool = True
    shard_dense: bool = False

    def __post_init__(self) -> None:
        if self.host_cache_mb <= 0:
            raise ValueError(f"host_cache_mb must be positive, got {self.host_cache_mb}")
        if self.working_set_mb < 0:
            raise ValueError(f"working_set_mb must be >= 0, got {self.working_set_mb}")
        if not 0.0 < self.lfu_beta <= 1.0:
            raise ValueError(f"lfu_beta must be in (0, 1], got {self.lfu_beta}")
        if self.lfu_decay_every < 1:
            raise ValueError(f"lfu_decay_every must be >= 1, got {self.lfu_decay_every}")
        if not 0.0 < self.evict_threshold <= 1.0:
            raise ValueError(f"evict_threshold must be in (0, 1], got {self.evict_threshold}")
        if not 0.0 <= self.clean_ahead <= 1.0:
            raise ValueError(f"clean_ahead must be in [0, 1], got {self.clean_ahead}")
        if self.writeback_every < 0:
            raise ValueError(f"writeback_every must be >= 0, got {self.writeback_every}")
        if not 0.0 <= self.prefetch_min_score <= 1.0:
            raise ValueError(f"prefetch_min_score must be in [0, 1], got {self.prefetch_min_score}")
