"""The ``storage:`` section of the training config: hierarchical storage of expert states.

Off by default; it needs ``optim.expert_update: lazy``. See :mod:`paddle_semoe.storage`.
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
        evict_threshold: occupancy watermark in (0, 1] above which the idle worker evicts
            least-hit entries (writing dirty ones back), so a prefetch finds a free slot.
        clean_ahead: fraction of the cache, least-hit first, that the idle worker keeps clean
            (0: off), so a miss evicts a clean entry and waits for a read only.
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
        for key, ok, rule in (
            ("host_cache_mb", self.host_cache_mb > 0, "positive"),
            ("working_set_mb", self.working_set_mb >= 0, ">= 0"),
            ("lfu_beta", 0.0 < self.lfu_beta <= 1.0, "in (0, 1]"),
            ("lfu_decay_every", self.lfu_decay_every >= 1, ">= 1"),
            ("evict_threshold", 0.0 < self.evict_threshold <= 1.0, "in (0, 1]"),
            ("clean_ahead", 0.0 <= self.clean_ahead <= 1.0, "in [0, 1]"),
            ("writeback_every", self.writeback_every >= 0, ">= 0"),
            ("prefetch_min_score", 0.0 <= self.prefetch_min_score <= 1.0, "in [0, 1]"),
        ):
            if not ok:
                raise ValueError(f"{key} must be {rule}, got {getattr(self, key)}")
