"""Where expert weights come from during inference: all-resident, a ring of K slots, or naive.

Every provider hands out, for MoE layer ``j`` (0-based position among the model's MoE
layers), the four expert tensors of that layer as Paddle tensors that share memory with a
NumPy buffer (zero copy), and is told when the layer is done with them:

* :class:`ResidentExperts` loads all N sections once and keeps them (the baseline).
* :class:`RingExperts` holds K fixed slots (allocated once). Slots start with layers
  ``0..K-1``; when layer ``j`` releases its slot, a loader thread fills it with layer
  ``(j + K) mod N``, so loading the next layers overlaps computing the current ones.
* :class:`OnDemandExperts` has one buffer and loads each layer synchronously before it runs.

:class:`LayerWeights` turns a provider into the expert-weight source of one MoE layer
(``GroupedExperts.weight_source``): the served model runs the training layer's own code.
Sources: :class:`HostSource` (every section in host memory, copied into slots) and
:class:`DiskSource` (streamed from the package files, ``direct=True``: O_DIRECT).
With ``trace=True`` a provider records (event, layer, slot, time) tuples, so tests can prove
that no slot is computed on before its load finished nor reloaded while in use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import paddle

from paddle_semoe.inference.package import (Manifest, PackageFile, Section, aligned_buffer,
                                            section_views)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sources
class ExpertSource(Protocol):
    """The section files of a package (``sections``, default the manifest's float32 ones)."""

    def read(self, index: int, offset: int, out: np.ndarray) -> None:
        """Fill ``out`` (uint8) with ``out.nbytes`` bytes of section ``index`` from ``offset``."""

    def close(self) -> None: ...


class HostSource:
    """All sections in host memory (read from the package files once); a read is a copy."""

    def __init__(self, manifest: Manifest, sections: Sequence[Section] | None = None):
        sections = manifest.sections if sections is None else sections
        self.buffers = [np.fromfile(manifest.root / s.file, dtype=np.uint8) for s in sections]

    def read(self, index: int, offset: int, out: np.ndarray) -> None:
        np.copyto(out, self.buffers[index][offset : offset + out.nbytes])

    def close(self) -> None:
        pass


class DiskSource:
    """Sections streamed from the package files on every read (see
    :class:`~paddle_semoe.inference.package.PackageFile`; ``direct``: O_DIRECT)."""

    def __init__(self, manifest: Manifest, direct: bool = True,
                 sections: Sequence[Section] | None = None):
        sections = manifest.sections if sections is None else sections
        self.files = [PackageFile(manifest.root / s.file, direct) for s in sections]

    def read(self, index: int, offset: int, out: np.ndarray) -> None:
        self.files[index].read(offset, out)

    def close(self) -> None:
        for f in self.files:
            f.close()


# ----------------------------------------------------------------------------- providers
class RoutedExpertProvider(Protocol):
    """An expert-granular provider (:class:`paddle_semoe.inference.cache.ExpertCache`): holds
    ``num_slots`` single-expert slots in arenas ``tensors`` {w1 [S,D,F], b1 [S,F], w2 [S,F,D],
    b2 [S,D]} (int8 slots add per-output-channel scales s1 [S,F], s2 [S,D]); loads only the
    experts a layer's routing selected; ``run_slots`` runs the grouped FFN on the arenas."""

    expert_granular: bool
    num_slots: int
    tensors: dict[str, paddle.Tensor]

    def run_slots(self, rows_RD: paddle.Tensor, counts_S: paddle.Tensor, compute: Callable[..., paddle.Tensor]) -> paddle.Tensor: ...

    def observe(self, j: int, experts: np.ndarray) -> None: ...

    def acquire_experts(self, j: int, experts: np.ndarray) -> np.ndarray: ...

    def release_experts(self, j: int, slots: np.ndarray) -> None: ...


class LayerWeights:
    """The expert-weight source (:class:`paddle_semoe.moe.experts.ExpertWeightSource`) of MoE
    layer ``j``: attached to that layer's ``GroupedExperts``, it runs the layer's own grouped
    FFN on the weights the provider holds for ``j``, between ``acquire(j)`` and ``release(j)``.

    With an expert-granular provider (``provider.expert_granular``), only the experts with
    nonzero counts are requested (in chunks of at most ``num_slots``); their rows are permuted
    into slot order, the grouped FFN runs on the slot arenas with per-slot counts, and the
    outputs are gathered back into expert order: bit-exact (float32 slots; quantized slots run
    the provider's quantized FFN, see ``run_slots``).

    Per-op dispatch is a decode step's cost, so for float32 host rows in one chunk the index
    bookkeeping and the row permutation are NumPy, into :class:`_SharedBuffer` s kept per row
    count, leaving the FFN and one ``gather`` (none when the slots ascend with the expert ids).
    Otherwise, or while another thread uses these buffers, :meth:`_run_chunked`.
    """

    def __init__(self, provider: ExpertProvider | RoutedExpertProvider, j: int):
        self.provider = provider
        self.j = j
        self._host: bool | None = None  # rows on CPU: the shared host buffers below are usable
        self._busy = threading.Lock()  # held while a call uses the shared buffers
        self._counts: _SharedBuffer | None = None  # int32 [num_slots]
        # (rows, D) -> (inverse index int64 [rows], slot-order rows float32 [rows, D])
        self._index: dict[tuple[int, int], tuple[_SharedBuffer, _SharedBuffer]] = {}

    def run(self, rows_RD: paddle.Tensor, counts_E: paddle.Tensor, compute: Callable[..., paddle.Tensor]) -> paddle.Tensor:
        if getattr(self.provider, "expert_granular", False):
            return self._run_routed(rows_RD, counts_E, compute)
        w = self.provider.acquire(self.j)  # type: ignore[union-attr]
        try:
            return compute(rows_RD, counts_E, w["w1"], w["b1"], w["w2"], w["b2"])
        finally:
            self.provider.release(self.j)  # type: ignore[union-attr]

    def _run_routed(self, rows_RD: paddle.Tensor, counts_E: paddle.Tensor, compute: Callable[..., paddle.Tensor]) -> paddle.Tensor:
        p: RoutedExpertProvider = self.provider  # type: ignore[assignment]
        counts = counts_E.numpy()
        active = np.flatnonzero(counts)
        p.observe(self.j, active)
        c = counts[active].astype(np.int64)  # rows per active expert, expert order
        n = int(c.sum())
        if self._host is None:
            self._host = bool(rows_RD.place.is_cpu_place())
        if (not 0 < active.size <= p.num_slots or n != int(rows_RD.shape[0]) or not self._host
                or rows_RD.dtype != paddle.float32 or not self._busy.acquire(blocking=False)):
            # (busy: another thread is in this layer's shared buffers; it gets fresh tensors)
            return self._run_chunked(p, rows_RD, counts.astype(np.int64), active, compute)
        try:
            slots = p.acquire_experts(self.j, active)
            try:
                counts_S = self._slot_counts(p.num_slots, slots, c)
                if active.size < 2 or bool((slots[1:] > slots[:-1]).all()):
                    # slots ascend with the expert ids: the expert-major rows are already in slot order
                    return p.run_slots(rows_RD, counts_S, compute)
                rows_t, inv_t = self._permute_rows(rows_RD, slots, c, n)
                y = p.run_slots(rows_t, counts_S, compute)
            finally:
                p.release_experts(self.j, slots)
            return paddle.gather(y, inv_t)
        finally:
            self._busy.release()

    def _slot_counts(self, num_slots: int, slots: np.ndarray, c: np.ndarray) -> paddle.Tensor:
        """int32 [num_slots] rows per slot (``c`` at ``slots``, zero elsewhere), in the shared buffer."""
        if self._counts is None or self._counts.array.size != num_slots:
            self._counts = _SharedBuffer(np.zeros(num_slots, np.int32))
        a = self._counts.array
        a.fill(0)
        a[slots] = c
        return self._counts.tensor

    def _permute_rows(self, rows_RD: paddle.Tensor, slots: np.ndarray, c: np.ndarray, n: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        """(the rows [n, D] in slot order, inverse index int64 [n]: slot-order row of each
        expert-major row) for active experts holding ``c`` rows each (expert order) in ``slots``:
        float32 host rows, permuted by NumPy into a shared buffer (no op)."""
        if n == c.size:  # one row per expert (decode at batch 1): slot-order row i is expert-major row order[i]
            idx = np.argsort(slots, kind="stable")
        else:
            idx = _slot_order_index(np.cumsum(c) - c, c, slots)
        D = int(rows_RD.shape[1])
        bufs = self._index.get((n, D))
        if bufs is None:
            if len(self._index) >= _MAX_INDEX_SIZES:
                self._index.clear()
            bufs = self._index[(n, D)] = (_SharedBuffer(np.empty(n, np.int64)), _SharedBuffer(np.empty((n, D), np.float32)))
        inv, rows = bufs
        inv.array[idx] = np.arange(n)
        np.take(rows_RD.numpy(), idx, axis=0, out=rows.array)
        return rows.tensor, inv.tensor

    def _run_chunked(self, p: RoutedExpertProvider, rows_RD: paddle.Tensor, counts: np.ndarray, active: np.ndarray,
                     compute: Callable[..., paddle.Tensor]) -> paddle.Tensor:
        """The general path: more active experts than slots (in chunks of ``num_slots``), none,
        padding rows past sum(counts) (they stay zero), or rows that are not float32 on the host."""
        out = paddle.zeros_like(rows_RD)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for c0 in range(0, active.size, p.num_slots):
            chunk = active[c0 : c0 + p.num_slots]
            slots = p.acquire_experts(self.j, chunk)
            try:
                idx = _slot_order_index(starts[chunk], counts[chunk], slots)
                counts_S = np.zeros(p.num_slots, np.int32)
                counts_S[slots] = counts[chunk]
                idx_t = paddle.to_tensor(idx)
                y = p.run_slots(paddle.gather(rows_RD, idx_t), paddle.to_tensor(counts_S), compute)
            finally:
                p.release_experts(self.j, slots)
            out = paddle.scatter(out, idx_t, y, overwrite=True)
        return out


def _slot_order_index(first: np.ndarray, c: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """int64 row index that puts rows into slot order: expert ``i`` holds rows ``first[i] ..
    first[i] + c[i] - 1`` and sits in ``slots[i]``."""
    order = np.argsort(slots, kind="stable")
    co = c[order]
    # slot-order row r of the run of expert order[g] is row first[order[g]] + (r - run start)
    return np.repeat(first[order] - (np.cumsum(co) - co), co) + np.arange(int(co.sum()))


_MAX_INDEX_SIZES = 64  # distinct row counts whose buffers a LayerWeights keeps


class _SharedBuffer:
    """A host NumPy array and a Paddle CPU tensor sharing its memory (written in place, read
    by the next op: CPU ops run synchronously, so rewriting it after the op returned is safe)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.tensor = paddle.utils.dlpack.from_dlpack(array)


@dataclass
class ProviderStats:
    loads: int = 0
    load_s: float = 0.0  # time spent loading (loader thread or synchronous)
    wait_s: float = 0.0  # time compute waited for a load to finish
    bytes_loaded: int = 0

    @property
    def overlap_ratio(self) -> float:
        """Share of the load time hidden behind compute (1.0: fully hidden)."""
        return max(0.0, 1.0 - self.wait_s / self.load_s) if self.load_s > 0 else 1.0


@dataclass
class _Slot:
    buffer: np.ndarray
    layer: int | None = None
    loaded: threading.Event = field(default_factory=threading.Event)
    in_use: bool = False


def _tensors(buffer: np.ndarray, manifest: Manifest, index: int) -> dict[str, paddle.Tensor]:
    views = section_views(buffer, manifest.sections[index])
    return {k: paddle.utils.dlpack.from_dlpack(v) for k, v in views.items()}


class _Traced:
    def __init__(self, trace: bool):
        self.trace_enabled = trace
        self.trace: list[tuple[str, int, int, float]] = []
        self._trace_lock = threading.Lock()

    def _event(self, kind: str, layer: int, slot: int) -> None:
        if self.trace_enabled:
            with self._trace_lock:
                self.trace.append((kind, layer, slot, time.perf_counter()))


class _LoaderThreads:
    """Loader threads running ``_load_job(*job)`` for the jobs of ``_queue`` (under ``_cv``) until
    :meth:`_stop_loaders`; a job that fails stores its exception in ``_error`` for the compute
    thread to raise."""

    def _init_loaders(self, threads: int, name: str) -> None:
        """Start ``threads`` loader threads on an empty queue."""
        self._queue: deque[tuple[int, int]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        names = [name] if threads == 1 else [f"{name}-{i}" for i in range(threads)]
        self._loaders = [threading.Thread(target=self._loop, name=n, daemon=True) for n in names]
        for t in self._loaders:
            t.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
            self._load_job(*job)

    def _load_job(self, key: int, slot: int) -> None:
        raise NotImplementedError

    def _stop_loaders(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._loaders:
            t.join(timeout=10)


class ExpertProvider(_Traced):
    """Hands out MoE layer ``j``'s expert tensors {w1 [E,D,F], b1 [E,F], w2 [E,F,D], b2 [E,D]}
    (float32, sharing memory with the provider's buffer) until ``release(j)``; loads sections
    of ``manifest`` from ``source``, counted in ``stats``."""

    def __init__(self, manifest: Manifest, source: ExpertSource, trace: bool):
        super().__init__(trace)
        self.manifest = manifest
        self.source = source
        self.stats = ProviderStats()

    def acquire(self, j: int) -> dict[str, paddle.Tensor]:
        raise NotImplementedError

    def release(self, j: int) -> None:
        raise NotImplementedError

    def resident_expert_bytes(self) -> int:
        raise NotImplementedError

    def _load(self, j: int, buffer: np.ndarray, slot: int | None) -> float:
        """Section ``j`` into ``buffer`` (uint8, 4096-aligned; traced as a load into ``slot`` unless
        None), counted in ``stats``; returns the seconds it took."""
        if slot is not None:
            self._event("load_start", j, slot)
        nbytes = self.manifest.sections[j].nbytes
        t0 = time.perf_counter()
        self.source.read(j, 0, buffer[:nbytes])
        dt = time.perf_counter() - t0
        self.stats.load_s += dt
        self.stats.loads += 1
        self.stats.bytes_loaded += nbytes
        if slot is not None:
            self._event("load_end", j, slot)
        return dt

    def close(self) -> None:
        self.source.close()


class ResidentExperts(ExpertProvider):
    """Every layer's experts loaded once and kept: the all-resident baseline."""

    def __init__(self, manifest: Manifest, source: ExpertSource, trace: bool = False):
        super().__init__(manifest, source, trace)
        self.buffers = [aligned_buffer(s.nbytes) for s in manifest.sections]
        for i, buf in enumerate(self.buffers):
            self._load(i, buf, None)
        self._tensors = [_tensors(b, manifest, i) for i, b in enumerate(self.buffers)]
        self.stats.load_s = 0.0  # start-up load is not part of serving

    def acquire(self, j: int) -> dict[str, paddle.Tensor]:
        self._event("compute_start", j, j)
        return self._tensors[j]

    def release(self, j: int) -> None:
        self._event("compute_end", j, j)

    def resident_expert_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)


class OnDemandExperts(ExpertProvider):
    """One buffer; each layer is loaded synchronously right before it runs (no overlap)."""

    def __init__(self, manifest: Manifest, source: ExpertSource, trace: bool = False):
        super().__init__(manifest, source, trace)
        self.buffer = aligned_buffer(manifest.max_section_bytes)

    def acquire(self, j: int) -> dict[str, paddle.Tensor]:
        self.stats.wait_s += self._load(j, self.buffer, 0)
        self._event("compute_start", j, 0)
        return _tensors(self.buffer, self.manifest, j)

    def release(self, j: int) -> None:
        self._event("compute_end", j, 0)

    def resident_expert_bytes(self) -> int:
        return self.buffer.nbytes


class RingExperts(ExpertProvider, _LoaderThreads):
    """K fixed slots cycling through the N MoE layers, filled by a background loader thread.

    Args:
        manifest: the package (sections in MoE-layer order).
        source: where sections come from (:class:`HostSource` or :class:`DiskSource`).
        num_slots: K; ``K >= N`` keeps every layer resident after the first loads.
    """

    def __init__(self, manifest: Manifest, source: ExpertSource, num_slots: int, trace: bool = False):
        if num_slots < 1:
            raise ValueError(f"ring needs at least one slot, got num_slots={num_slots}")
        super().__init__(manifest, source, trace)
        self.n_layers = len(manifest.sections)
        self.k = min(num_slots, self.n_layers)
        self.slots = [_Slot(aligned_buffer(manifest.max_section_bytes)) for _ in range(self.k)]
        self._slot_of: dict[int, int] = {}
        self._init_loaders(1, "expert-ring-loader")
        for j in range(self.k):
            self._schedule(j, j)

    # -- loader thread --------------------------------------------------------------
    def _schedule(self, layer: int, slot: int) -> None:
        s = self.slots[slot]
        with self._cv:
            s.layer = layer
            s.loaded.clear()
            self._slot_of[layer] = slot
            self._queue.append((layer, slot))
            self._cv.notify()

    def _load_job(self, layer: int, slot: int) -> None:
        s = self.slots[slot]
        try:
            if s.in_use:  # never happens by construction; fail loudly if it does
                raise RuntimeError(f"ring: slot {slot} is still in use while loading layer {layer}")
            self._load(layer, s.buffer, slot)
        except BaseException as exc:  # surface in the compute thread
            self._error = exc
        s.loaded.set()

    # -- compute side ---------------------------------------------------------------
    def acquire(self, j: int) -> dict[str, paddle.Tensor]:
        slot = self._slot_of.get(j)
        if slot is None:
            raise RuntimeError(f"ring: layer {j} is not scheduled (layers must run in order 0..{self.n_layers - 1})")
        s = self.slots[slot]
        t0 = time.perf_counter()
        s.loaded.wait()
        self.stats.wait_s += time.perf_counter() - t0
        if self._error is not None:
            raise self._error
        if s.layer != j:
            raise RuntimeError(f"ring: slot {slot} holds layer {s.layer}, not {j}")
        s.in_use = True
        self._event("compute_start", j, slot)
        return _tensors(s.buffer, self.manifest, j)

    def release(self, j: int) -> None:
        slot = self._slot_of[j]
        self._event("compute_end", j, slot)
        self.slots[slot].in_use = False
        if self.k < self.n_layers:
            del self._slot_of[j]
            self._schedule((j + self.k) % self.n_layers, slot)

    def resident_expert_bytes(self) -> int:
        return sum(s.buffer.nbytes for s in self.slots)

    def close(self) -> None:
        self._stop_loaders()
        self.source.close()


def slots_for_budget(manifest: Manifest, budget_bytes: int) -> int:
    """K = how many of the largest sections fit the budget (at least 1, at most N)."""
    per = manifest.max_section_bytes
    if budget_bytes < per:
        raise ValueError(
            f"expert memory budget {budget_bytes} B is below one MoE layer's experts ({per} B): the ring needs >= 1 slot"
        )
    return max(1, min(len(manifest.sections), budget_bytes // per))
