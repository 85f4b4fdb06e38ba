"""Expert states in three tiers (SE-MoE items 2-3): working set, host cache, SSD.

:class:`TieredExperts` owns every local expert of every MoE layer of one rank and is attached
to each :class:`~paddle_semoe.moe.experts.GroupedExperts` as its weight source (the model is
built inside :func:`~paddle_semoe.moe.experts.deferred_expert_weights`, so no expert stack is
ever allocated). One training step (told in full in ``storage/README.md``): each MoE layer's
forward copies its active experts' fp32 master weights from the host cache (misses loaded from
SSD) into compact working-set stacks, dropping zero-count experts, while the worker prefetches
what later layers will probably need (:mod:`~paddle_semoe.storage.predictor`); the backward's
working-set gradients are harvested per expert; the lazy AdamW
(:mod:`~paddle_semoe.storage.adamw`) updates each activated expert's host-cache slot, which is
written back when evicted, every ``writeback_every`` steps and at checkpoints.

Counters are in :attr:`TieredExperts.stats`. Restrictions: every expert is owned by exactly one
rank (``ep_degree`` = world size), and the model's expert stacks never exist as parameters
(checkpoints hold the SSD tier instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import mmap
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import paddle

from paddle_semoe.io.files import FileRecord, sha256_bytes, write_atomic
from paddle_semoe.moe.experts import GroupedExperts
from paddle_semoe.storage.adamw import AdamWHyper, adamw_update_, sq_sum, step_scalars
from paddle_semoe.storage.cache import OPTIM, PREFETCH, URGENT, HostCache
from paddle_semoe.storage.config import StorageConfig
from paddle_semoe.storage.layout import PARAM_NAMES, ExpertStateLayout
from paddle_semoe.storage.policy import LFUDecayPolicy
from paddle_semoe.storage.predictor import CoActivationPredictor
from paddle_semoe.storage.ssd import SSDTier, StorageError, state_file_name
from paddle_semoe.storage.stats import StorageStats
from paddle_semoe.storage.workingset import WorkingSetArena

logger = logging.getLogger(__name__)

INDEX_FORMAT = "paddle-semoe-expert-store/1"
EXPERTS_DIR = "experts"

InitFn = Callable[[int, int, str, tuple], np.ndarray]  # (layer, global expert, tensor name, shape) -> float32


def index_name(rank: int) -> str:
    """Checkpoint-relative name of one rank's SSD-tier index."""
    return f"{EXPERTS_DIR}/rank_{rank:05d}.json"


@dataclasses.dataclass(frozen=True)
class _LayerSource:
    """The weight source attached to one GroupedExperts (see ``GroupedExperts.weight_source``)."""

    owner: "TieredExperts"
    layer: int

    def run(self, rows_RD: paddle.Tensor, counts_E: paddle.Tensor, compute: Callable) -> paddle.Tensor:
        return self.owner.run_layer(self.layer, rows_RD, counts_E, compute)


class TieredExperts:
    """Hierarchical storage of one rank's expert states.

    Args:
        cfg: the ``storage`` config section.
        experts: the model's GroupedExperts in model order (built without weights).
        num_local: local experts per layer; ``expert_offset``: global index of local expert 0.
        hyper: AdamW constants of the expert update.
        root: this rank's SSD-tier directory.
        world_size: gradients of experts are scaled by ``1 / world_size`` like every gradient
            (the mean over ranks of the per-rank mean losses).
    """

    def __init__(
        self,
        cfg: StorageConfig,
        experts: Sequence,
        num_local: int,
        expert_offset: int,
        hyper: AdamWHyper,
        root: Path,
        world_size: int = 1,
    ):
        if not experts:
            raise ValueError("tiered expert storage needs at least one MoE layer")
        dims = {(ge.d_model, ge.d_ff) for ge in experts}
        if len(dims) != 1:
            raise ValueError(f"all MoE layers must share d_model and expert d_ff for tiered storage, got {sorted(dims)}")
        D, F = dims.pop()
        self.cfg = cfg
        self.layout = ExpertStateLayout(D, F)
        self.L = len(experts)
        self.E = num_local
        self.offset = expert_offset
        self.hyper = hyper
        self.grad_scale = np.float32(1.0 / world_size) if world_size > 1 else None
        self.stats = StorageStats()
        self.ssd = SSDTier(root, self.layout, o_direct=cfg.o_direct, fsync=cfg.fsync, verify=cfg.verify_reads)
        self.ssd.recover()
        slots = int(cfg.host_cache_mb * 2**20) // self.layout.slot_bytes
        self.policy = LFUDecayPolicy(self.L * self.E, cfg.lfu_beta, cfg.lfu_decay_every, cfg.evict_threshold)
        self.cache = HostCache(
            self.layout, min(slots, self.L * self.E), self.ssd, self.policy, self.locate, self.stats, cfg.clean_ahead
        )
        self.arena = WorkingSetArena(int(cfg.working_set_mb * 2**20))
        self.predictor = CoActivationPredictor(self.L, self.E)
        self.t = 0  # optimizer steps taken (the lazy AdamW's global step count)
        self.initialized = False
        self._retained: list[tuple[int, np.ndarray, list[paddle.Tensor]]] = []
        self._grads: dict[int, list[np.ndarray | None]] = {}
        self._grads_final = False
        self._step_active = np.zeros((self.L, self.E), dtype=bool)
        self._protect: set[int] = set()
        self._arena_high = 0
        for i, ge in enumerate(experts):
            ge.weight_source = _LayerSource(self, i)
        logger.info(
            "tiered experts: %d layers x %d local experts, %.1f MiB per state; host cache %d slots (%.0f MiB), "
            "working set %.0f MiB, SSD %s (%.0f MiB)",
            self.L, self.E, self.layout.slot_bytes / 2**20, self.cache.num_slots,
            self.cache.num_slots * self.layout.slot_bytes / 2**20, cfg.working_set_mb, root,
            self.L * self.E * self.ssd.file_bytes / 2**20,
        )

    # ------------------------------------------------------------------ keys
    def key(self, layer: int, local: int) -> int:
        return layer * self.E + local

    def locate(self, key: int) -> tuple[int, int]:
        """key -> (layer, global expert)."""
        return key // self.E, self.offset + key % self.E

    def all_files(self) -> list[tuple[int, int]]:
        return [self.locate(k) for k in range(self.L * self.E)]

    # ------------------------------------------------------------------ initialization
    def initialize(self, init: InitFn) -> None:
        """Write every local expert's initial state (weights from ``init``, zero moments)."""
        self.cache.drop_all()
        buf = mmap.mmap(-1, self.layout.slot_bytes)
        floats = np.frombuffer(buf, dtype=np.float32)
        sections = self.layout.views(floats)
        for layer, g in self.all_files():
            floats.fill(0.0)
            for name, shape in self.layout.shapes.items():
                sections["master"][name][...] = init(layer, g, name, shape)
            self.ssd.write(layer, g, memoryview(buf), seq=0, writeback=False)
        del sections, floats
        buf.close()
        self.t = 0
        self.initialized = True

    def _check_ready(self) -> None:
        if not self.initialized:
            raise RuntimeError("tiered expert store used before initialize() or restore_checkpoint()")

    # ------------------------------------------------------------------ forward
    def _request_prefetch(self, layer: int, scores: np.ndarray | None, limit: int, ahead: int = 1) -> list[int]:
        """Ask the worker for layer ``layer``'s likely experts: at most ``limit`` (about as many
        as the layer will activate), score >= ``prefetch_min_score``, best score first and, among
        equal scores, most hits first. Returns the predicted keys (cached or not)."""
        if not self.cfg.prefetch or scores is None or limit <= 0:
            return []
        cand = [e for e in range(self.E) if scores[e] >= self.cfg.prefetch_min_score]
        cand.sort(key=lambda e: (-scores[e], -self.policy.hits[self.key(layer, e)], e))
        keys = [self.key(layer, e) for e in cand[:limit]]
        self.cache.request(keys, PREFETCH, ahead=ahead)
        return keys

    @contextlib.contextmanager
    def _pinned(self, key: int, tally: list, write: bool = False) -> Iterator[dict]:
        """Pin ``key``'s cache slot and yield its section views; adds (wait s, work s, hit) to
        ``tally``. ``write=True`` marks the slot dirty on release."""
        entry, hit, waited = self.cache.acquire(key, write=write)
        t0 = time.perf_counter()
        try:
            yield self.layout.views(self.cache.slot_floats(entry))
        finally:
            self.cache.release(entry, dirty=write)
        tally[:] = [tally[0] + waited, tally[1] + time.perf_counter() - t0, tally[2] + int(hit)]

    def run_layer(self, layer: int, rows_RD: paddle.Tensor, counts_E: paddle.Tensor, compute: Callable) -> paddle.Tensor:
        """Run one MoE layer's grouped FFN on the working-set copies of its active experts."""
        self._check_ready()
        counts = np.asarray(counts_E.numpy()).astype(np.int64).reshape(-1)
        if counts.size != self.E:
            raise ValueError(f"MoE layer {layer}: {counts.size} expert counts, the store has {self.E} local experts")
        grad = paddle.is_grad_enabled()
        mask = counts > 0
        active = np.flatnonzero(mask)
        D, F = self.layout.d_model, self.layout.d_ff
        mark = self.arena.mark()
        self.cache.next_epoch()
        if active.size == 0:  # nothing routed here: one empty expert keeps the op (and autograd) in place
            w = self.arena.alloc([(1, D, F), (1, F), (1, F, D), (1, D)], what=f"MoE layer {layer}")
            for a in w:
                a.fill(0.0)
            out = compute(rows_RD, paddle.zeros([1], dtype="int32"), *[paddle.utils.dlpack.from_dlpack(a) for a in w])
            if not grad:
                self.arena.reset(mark)
            return out
        keys = [self.key(layer, int(e)) for e in active]
        self.cache.record_hits(keys)
        if grad:
            self._step_active[layer, active] = True
        cached = [self.cache.cached(k) for k in keys]
        self.cache.request([k for k, c in zip(keys, cached) if not c], URGENT)
        predicted = []  # every later layer, nearest first: the worker runs several layers ahead
        for target in range(layer + 1, self.L):
            predicted += self._request_prefetch(
                target, self.predictor.later_layer(layer, mask, target), limit=active.size, ahead=target - layer
            )
        self._protect.update(keys)
        self.cache.protect(self._protect | set(predicted))
        A = active.size
        stacks = self.arena.alloc([(A, D, F), (A, F), (A, F, D), (A, D)], what=f"MoE layer {layer} ({A} experts)")
        tally = [0.0, 0.0, 0]
        for j in [j for j in range(A) if cached[j]] + [j for j in range(A) if not cached[j]]:
            with self._pinned(keys[j], tally) as sec:
                for k, name in enumerate(PARAM_NAMES):
                    np.copyto(stacks[k][j], sec["master"][name])
        wait, h2d, hits = tally
        self._arena_high = max(self._arena_high, self.arena.used + self.arena.overflow_bytes)
        self.stats.add(
            accesses=A, hits=hits, wait_s=wait, forward_wait_s=wait, h2d_s=h2d,
            h2d_bytes=A * self.layout.weight_bytes,
        )
        tensors = [paddle.utils.dlpack.from_dlpack(a) for a in stacks]
        for t in tensors:
            t.stop_gradient = not grad
        out = compute(rows_RD, paddle.to_tensor(counts[active].astype(np.int32)), *tensors)
        if grad:
            self._retained.append((layer, active, tensors))
        else:
            del tensors
            self.arena.reset(mark)
        return out

    # ------------------------------------------------------------------ backward
    def after_backward(self) -> None:
        """Harvest the working-set gradients of the micro-batch just back-propagated."""
        for layer, active, tensors in self._retained:
            views = [None if t.grad is None else np.from_dlpack(t.grad.detach()) for t in tensors]
            for j, e in enumerate(active):
                acc = self._grads.setdefault(self.key(layer, int(e)), [None] * len(views))
                for k, v in enumerate(views):  # micro-batches add up, like Paddle's accumulation
                    a = acc[k]
                    if v is not None:
                        acc[k] = v[j] if a is None else np.add(a, v[j], out=a)
        self._retained.clear()
        self.arena.reset()

    def _finish_grads(self) -> None:
        if self._retained:
            self.after_backward()
        if self._grads_final:
            return
        if self.grad_scale is not None:  # the 1/world scaling the gradient reducer applies to every class
            for g in (g for gs in self._grads.values() for g in gs if g is not None):
                np.multiply(g, self.grad_scale, out=g)
        self._grads_final = True

    # ------------------------------------------------------------------ optimizer
    def param_ids(self) -> set[int]:
        return set()

    def set_active(self, kept_local: Sequence[np.ndarray]) -> None:
        """Cross-check: the experts that received rows here are the ones the ranks routed to
        (``kept_local[layer]`` [E_local], summed over micro-batches and ranks)."""
        for layer, kept in enumerate(kept_local):
            expect = np.asarray(kept) > 0
            if not np.array_equal(expect, self._step_active[layer]):
                raise RuntimeError(
                    f"MoE layer {layer}: experts with tokens by routing {np.flatnonzero(expect).tolist()} != experts "
                    f"computed here {np.flatnonzero(self._step_active[layer]).tolist()} (is ep_degree the world size?)"
                )

    def sq_norm(self) -> float:
        self._finish_grads()
        return sum((sq_sum(g) for key in sorted(self._grads) for g in self._grads[key]), 0.0)

    @paddle.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """Lazy AdamW on every activated expert's state, in the host cache."""
        self._check_ready()
        self._finish_grads()
        self.t += 1
        s = step_scalars(self.hyper, lr, self.t, grad_scale)
        self.cache.write_seq = self.t
        keys = sorted(self._grads)
        cached = [k for k in keys if self.cache.cached(k)]
        missing = [k for k in keys if not self.cache.cached(k)]
        pending = set(keys)  # protected until updated: the updated ones are the first to go
        self.cache.protect(pending)
        # loads run ahead of the updates by at most half the cache, so a state loaded for the
        # update is not evicted again before its turn when the step touches more than fits
        window = max(self.cache.num_slots // 2, 1)
        self.cache.request(missing[:window], OPTIM)
        tally = [0.0, 0.0, 0]
        for i, key in enumerate(cached + missing):
            j = i - len(cached) + window
            if 0 <= j < len(missing):
                self.cache.request([missing[j]], OPTIM)
            with self._pinned(key, tally, write=True) as sec:
                w, m, v = sec["master"], sec["m"], sec["v"]
                for name, g in zip(PARAM_NAMES, self._grads[key]):
                    adamw_update_(w[name], m[name], v[name], g, s, decay=True)
            pending.discard(key)
            self.cache.protect(pending)
        wait, upd, hits = tally
        self.stats.add(
            optim_accesses=len(keys), optim_hits=hits, wait_s=wait, optim_wait_s=wait, update_s=upd,
            steps=1, touched_experts=len(keys),
        )
        self._end_step(observe=True)
        self.cache.tick()
        if self.cfg.writeback_every and self.t % self.cfg.writeback_every == 0:
            self.cache.request_flush()

    def discard(self) -> None:
        """A skipped step: drop its gradients, update nothing."""
        self._retained.clear()
        self.arena.reset()
        self._end_step(observe=False)

    def clear_grad(self) -> None:
        """Nothing to clear: working-set gradients are dropped at the end of every step."""

    def _end_step(self, observe: bool) -> None:
        if observe:
            self.predictor.observe(self._step_active)
        self._grads.clear()
        self._grads_final = False
        self._step_active[:] = False
        self._protect = set()
        last = self.predictor.last
        predicted = self._request_prefetch(0, self.predictor.first_layer(), limit=int(last[0].sum()) if last is not None else 0)
        self.cache.protect(set(predicted))

    # ------------------------------------------------------------------ metrics
    def interval_scalars(self) -> dict[str, float]:
        self.stats.set_gauges(
            host_resident_bytes=float(self.cache.resident_bytes()),
            host_capacity_bytes=float(self.cache.num_slots * self.layout.slot_bytes),
            device_resident_bytes=float(self._arena_high),
            device_capacity_bytes=float(self.arena.capacity),
            ssd_resident_bytes=float(self.L * self.E * self.ssd.file_bytes),
            dirty_states=float(len(self.cache.dirty_keys())),
        )
        self._arena_high = 0
        return self.stats.interval(self.L * self.E)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, ckpt_dir: Path, rank: int) -> FileRecord:
        """Write back every dirty state and link the SSD tier into ``ckpt_dir/experts``.

        Returns the record of this rank's index file (for the manifest).
        """
        self._check_ready()
        self.cache.flush()
        infos = self.ssd.snapshot(Path(ckpt_dir) / EXPERTS_DIR, self.all_files())
        index = {
            "format": INDEX_FORMAT,
            "rank": rank,
            "step_count": self.t,
            "layers": self.L,
            "num_local": self.E,
            "expert_offset": self.offset,
            "d_model": self.layout.d_model,
            "d_ff": self.layout.d_ff,
            "files": [dataclasses.asdict(i) for i in infos],
        }
        data = json.dumps(index, indent=1, sort_keys=True).encode()
        name = index_name(rank)
        write_atomic(Path(ckpt_dir) / name, data)
        return FileRecord(name, sha256_bytes(data), len(data))

    def restore_checkpoint(self, ckpt_dir: Path, index_names: Sequence[str]) -> None:
        """Replace the SSD tier by a checkpoint's (any expert-parallel degree: files are per
        global expert), verifying every state file against the index and its own checksums."""
        ckpt_dir = Path(ckpt_dir)
        expected: dict[str, int] = {}
        steps = set()
        for name in index_names:
            path = ckpt_dir / name
            try:
                index = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise StorageError(f"expert store index {path} cannot be read: {exc}") from exc
            if index.get("format") != INDEX_FORMAT:
                raise StorageError(f"expert store index {path} has format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
            if (index["d_model"], index["d_ff"]) != (self.layout.d_model, self.layout.d_ff) or index["layers"] != self.L:
                raise StorageError(
                    f"expert store index {path}: {index['layers']} layers of d_model={index['d_model']} d_ff={index['d_ff']}, "
                    f"the model has {self.L} of d_model={self.layout.d_model} d_ff={self.layout.d_ff}"
                )
            steps.add(int(index["step_count"]))
            expected.update({f["name"]: int(f["crc32"]) for f in index["files"]})
        if len(steps) != 1:
            raise StorageError(f"checkpoint {ckpt_dir}: expert store indexes disagree on the step count: {sorted(steps)}")
        self.cache.drop_all()
        self.ssd.restore(ckpt_dir / EXPERTS_DIR, expected, self.all_files())
        self.ssd.release_scratch()
        self.t = steps.pop()
        self._end_step(observe=False)
        self.initialized = True

    def verify(self) -> int:
        """Check every local state file against its checksums; returns how many were checked."""
        n = len(self.ssd.verify_all(self.all_files()))
        self.ssd.release_scratch()
        return n

    def close(self) -> None:
        self.cache.close()


def expected_index_names(manifest_files: Sequence[str]) -> list[str]:
    """The SSD-tier index files listed in a checkpoint manifest."""
    return sorted(n for n in manifest_files if n.startswith(f"{EXPERTS_DIR}/") and n.endswith(".json"))


__all__ = ["EXPERTS_DIR", "TieredExperts", "build_tiered_experts", "expected_index_names", "index_name", "state_file_name"]


def build_tiered_experts(cfg, model, layout, rank: int, world_size: int) -> TieredExperts:
    """The tiered store of a training job (``cfg``: TrainConfig; ``layout``: ExpertLayout),
    attached to every GroupedExperts of ``model`` (built under ``deferred_expert_weights``)."""
    if layout.ep_degree != world_size:
        raise ValueError(
            f"storage.enabled=true needs every expert owned by exactly one rank: parallel.ep_degree="
            f"{layout.ep_degree} must equal the number of processes ({world_size})"
        )
    experts = [m for _, m in model.named_sublayers() if isinstance(m, GroupedExperts)]
    if any(ge.w1 is not None for ge in experts):
        raise ValueError("tiered storage needs a model built under paddle_semoe.moe.experts.deferred_expert_weights()")
    base = Path(cfg.storage.dir) if cfg.storage.dir else Path(cfg.train.output_dir) / "expert_store"
    o = cfg.optim
    return TieredExperts(
        cfg.storage, experts, layout.num_local, layout.offset,
        AdamWHyper(o.beta1, o.beta2, o.eps, o.weight_decay), base / f"rank_{rank:05d}", world_size,
    )
