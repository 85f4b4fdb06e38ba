"""Expert-granular serving: a hot-expert cache of single-expert slots, loaded on routing.

A decode step routes each token to k of E experts per MoE layer, so a layer-granular ring
streams all E experts to use a handful. Here the unit is one expert of one layer:

* :class:`DiskExpertReader` / :class:`HostExpertReader` read expert ``e`` of MoE layer ``j``
  (its ``w1[e]`` and ``w2[e]`` rows, see ``Section.expert_range``) straight into a slot, with
  ``verify`` checked against the package's per-expert CRC-32.
* :class:`ExpertCache` holds S slots in arenas ``w1 [S,D,F]``, ``b1 [S,F]``, ``w2 [S,F,D]``,
  ``b2 [S,D]`` (allocated once; every expert's biases stay resident, ~0.2% of the bytes).
  :class:`~paddle_semoe.inference.ring.LayerWeights` hands it the experts a layer's routing
  selected; hits are used in place, misses are loaded by loader threads into slots freed by an
  eviction policy of :mod:`paddle_semoe.inference.cache_policy`. The grouped FFN then runs on
  the arenas with per-slot counts: the same op on the same weights, bit-exact with
  all-resident serving. With ``quant="int8"`` / ``"int4"`` the slots hold the quantized
  weights as stored (a quarter / an eighth of the bytes, so a budget holds ~4x / ~8x the
  experts) and :func:`paddle_semoe.ops.grouped_ffn_int8` / ``grouped_ffn_int4`` run them.
* :meth:`ExpertCache.prefetch` is the pre-gating hook: layer j+1's router applied to layer j's
  input predicts layer j+1's experts, which are loaded while layer j computes.

:func:`routing_requests` turns a recorded routing trace into the requests that
:func:`~paddle_semoe.inference.cache_policy.belady_hit_rate` replays with the offline optimum.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import paddle

from paddle_semoe import ops
from paddle_semoe.inference.package import (INT4_GROUP, Manifest, PackageError, Section,
                                            aligned_buffer)
from paddle_semoe.inference.ring import (DiskSource, ExpertSource, HostSource, ProviderStats,
                                         _LoaderThreads, _Traced)
from paddle_semoe.inference.cache_policy import (  # belady_hit_rate: re-exported for tools/
    EvictionPolicy, LayerDistancePolicy, belady_hit_rate)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class ExpertGeometry:
    """Shapes shared by every MoE layer of a package: L layers of E experts, D -> F -> D."""

    layers: int
    experts: int
    d_model: int
    d_ff: int

    @classmethod
    def of(cls, manifest: Manifest) -> "ExpertGeometry":
        if not manifest.sections:
            raise PackageError(f"package {manifest.root} has no expert sections")
        shapes = {(s.tensor("w1").shape, s.tensor("w2").shape) for s in manifest.sections}
        if len(shapes) != 1:
            raise PackageError(f"package {manifest.root}: MoE layers differ in expert shapes {sorted(shapes)}")
        (E, D, F), _ = shapes.pop()
        for s in manifest.sections:
            if s.tensor("w1").dtype != "float32":
                raise PackageError(f"section {s.file}: expert cache serves float32 sections, got {s.tensor('w1').dtype}")
        return cls(len(manifest.sections), E, D, F)

    @property
    def matrix_bytes(self) -> int:
        """Bytes of one expert's w1 (= its w2)."""
        return self.d_model * self.d_ff * 4

    @property
    def slot_bytes(self) -> int:
        """Bytes one slot holds: w1, w2 and the two bias rows."""
        return 2 * self.matrix_bytes + (self.d_ff + self.d_model) * 4

    @property
    def streamed_bytes(self) -> int:
        """Bytes one expert load reads (w1 and w2 ranges)."""
        return 2 * self.matrix_bytes

    def weight_bytes(self, quant: str) -> int:
        """Bytes of one expert's w1 (= its w2) as stored in a slot: float32, int8, or int4 (two
        values per byte)."""
        n = self.d_model * self.d_ff
        return {"float32": 4 * n, "int8": n, "int4": n // 2}[quant]

    def scale_shapes(self, quant: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of one expert's w1 and w2 scales: () for float32, [F] / [D] per output channel
        for int8, [ceil(D/G), F] / [ceil(F/G), D] per group of G = INT4_GROUP input rows for int4."""
        D, F = self.d_model, self.d_ff
        if quant == "int8":
            return (F,), (D,)
        if quant == "int4":
            return (-(-D // INT4_GROUP), F), (-(-F // INT4_GROUP), D)
        return (), ()

    def scale_bytes(self, quant: str) -> int:
        """Bytes of one expert's scales (w1 and w2; 0 for float32)."""
        shapes = self.scale_shapes(quant) if quant != "float32" else ()
        return sum(4 * int(np.prod(s)) for s in shapes)

    def quant_slot_bytes(self, quant: str) -> int:
        """Bytes one slot holds for ``quant``: w1, w2, the two bias rows and (int8/int4) the scales."""
        return 2 * self.weight_bytes(quant) + (self.d_ff + self.d_model) * 4 + self.scale_bytes(quant)


# ----------------------------------------------------------------------------- readers
QUANTS = ("float32", "int8", "int4")


def _tensor_table(manifest: Manifest, sections: tuple[Section, ...], name: str) -> np.ndarray:
    """One small per-expert tensor (a bias or a scale) of every layer, stacked: [L, E, N]."""
    rows = []
    for s in sections:
        t = s.tensor(name)
        with open(manifest.root / s.file, "rb") as f:
            f.seek(t.offset)
            rows.append(np.frombuffer(f.read(t.nbytes), dtype=np.dtype(t.dtype)).reshape(t.shape))
    return np.stack(rows)


class ExpertReader:
    """Reads expert ``e`` of layer ``j`` straight into a slot: float32 sections into a float32
    slot, int8 / int4 sections (``quant="int8"`` / ``"int4"``) into an int8 / packed-int4 slot,
    as stored (no staging, no dequantization: the quantized expert FFN reads them). Their
    scales stay resident: ``scale1`` / ``scale2`` float32 [L, E, *scale_shapes[0 / 1]].
    Subclasses set ``source``, the :class:`~paddle_semoe.inference.ring.ExpertSource` of
    ``sections``."""

    source: ExpertSource

    def __init__(self, manifest: Manifest, quant: str, verify: bool):
        if quant not in QUANTS:
            raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
        self.manifest, self.quant, self.verify = manifest, quant, verify
        self.geo = ExpertGeometry.of(manifest)
        if quant in ("int8", "int4"):
            quantized = manifest.int8_sections if quant == "int8" else manifest.int4_sections
            if len(quantized) != len(manifest.sections):
                raise PackageError(f"package {manifest.root} has no {quant} expert sections (export it with {quant}=True"
                                   f"{', tools/export.py --int8' if quant == 'int8' else ''})")
            self.sections = quantized
            self.scale1 = _tensor_table(manifest, self.sections, "w1_scale")
            self.scale2 = _tensor_table(manifest, self.sections, "w2_scale")
            want = tuple((self.geo.layers, self.geo.experts) + sh for sh in self.geo.scale_shapes(quant))
            if (self.scale1.shape, self.scale2.shape) != want:
                raise PackageError(f"package {manifest.root}: {quant} scales {self.scale1.shape} / {self.scale2.shape}, "
                                   f"expected {want[0]} / {want[1]}")
        else:
            self.sections = manifest.sections

    @property
    def resident_bytes(self) -> int:
        """Host memory the reader keeps for serving (int8/int4 scales)."""
        return self.scale1.nbytes + self.scale2.nbytes if self.quant != "float32" else 0

    def read(self, j: int, e: int, w1_out: np.ndarray, w2_out: np.ndarray) -> int:
        """Fill the uint8 slot views ``w1_out``/``w2_out`` (``geo.weight_bytes(quant)`` bytes
        each: float32, int8 or packed int4 values) with expert ``e`` of MoE layer ``j``; returns the bytes
        read from the source."""
        sec = self.sections[j]
        nbytes = self.geo.weight_bytes(self.quant)
        if w1_out.nbytes < nbytes or w2_out.nbytes < nbytes:
            raise ValueError(f"expert reader: slot views of {w1_out.nbytes} and {w2_out.nbytes} B, "
                             f"one {self.quant} expert matrix needs {nbytes} B")
        n = 0
        for name, out in (("w1", w1_out), ("w2", w2_out)):
            off, nb = sec.expert_range(name, e)
            self.source.read(j, off, out[:nb])
            n += nb
        if self.verify and sec.expert_crc32:
            got = zlib.crc32(w2_out[: n // 2].data, zlib.crc32(w1_out[: n // 2].data))
            if got != sec.expert_crc32[e]:
                raise PackageError(
                    f"inference package file {self.manifest.root / sec.file}: expert {e} fails its "
                    f"CRC-32 ({got:#010x} != {sec.expert_crc32[e]:#010x}); the file is corrupt")
        return n

    def close(self) -> None:
        self.source.close()


class DiskExpertReader(ExpertReader):
    """Reads single experts from the section files (a
    :class:`~paddle_semoe.inference.ring.DiskSource`: re-checked before every read).

    Args:
        direct: O_DIRECT, so the page cache never serves a read (see ``PackageFile``).
        verify: check each expert read against the manifest's per-expert CRC-32.
        quant: ``float32``, ``int8`` or ``int4`` sections.
    """

    def __init__(self, manifest: Manifest, direct: bool = True, verify: bool = False, quant: str = "float32"):
        super().__init__(manifest, quant, verify)
        self.direct = direct
        self.source = DiskSource(manifest, direct, self.sections)


class HostExpertReader(ExpertReader):
    """Every section in host memory (a :class:`~paddle_semoe.inference.ring.HostSource`, read
    once); a load is a copy."""

    def __init__(self, manifest: Manifest, verify: bool = False, quant: str = "float32"):
        super().__init__(manifest, quant, verify)
        self.source = HostSource(manifest, self.sections)


# ----------------------------------------------------------------------------- the cache
@dataclass
class CacheStats:
    accesses: int = 0  # (layer, expert) uses requested by forwards
    hits: int = 0  # ... found in a slot (loaded or in flight)
    misses: int = 0
    prefetch_loads: int = 0  # speculative loads issued
    predicted: int = 0  # experts predicted by pre-gating
    predicted_used: int = 0  # ... that the layer then used
    used_after_prediction: int = 0  # experts used by layers that had a prediction

    @property
    def hit_rate(self) -> float:
        """Live hit rate: requested experts found in a slot (a prefetched one counts)."""
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def loads(self) -> int:
        """Loads issued: demand misses and prefetches (used or wasted)."""
        return self.misses + self.prefetch_loads

    @property
    def load_hit_rate(self) -> float:
        """1 - loads / requests, wasted prefetches included: comparable with Belady's MIN
        (:func:`belady_hit_rate`) with or without prefetch."""
        return 1.0 - self.loads / self.accesses if self.accesses else 0.0

    @property
    def prediction_precision(self) -> float:
        """Share of predicted experts the layer used."""
        return self.predicted_used / self.predicted if self.predicted else 0.0


class ExpertCache(_Traced, _LoaderThreads):
    """S single-expert slots over every MoE layer, a pluggable eviction policy (default LFU with
    decay weighted by layer distance), asynchronous loader threads.

    Args:
        manifest: the package.
        reader: where experts come from (:class:`DiskExpertReader` or :class:`HostExpertReader`).
        num_slots: S, experts held at once (>= 1).
        beta, decay_every: LFU decay of the default policy: hit counters are multiplied by
            ``beta`` every ``decay_every`` forward passes.
        policy: the eviction policy (:class:`~paddle_semoe.inference.cache_policy.EvictionPolicy`,
            reset to this cache's geometry and told every use, prediction, load and eviction as
            :func:`~paddle_semoe.inference.cache_policy.replay` tells it, so a replay of the
            recorded trace reproduces the demand hits while no layer uses more experts than
            there are slots); None: ``LayerDistancePolicy(beta, decay_every=decay_every)``.
        loader_threads: concurrent loads (several reads in flight keep a fast disk busy).
        record_routing: keep the routing trace (``routing``: one (layer, expert ids) per
            :meth:`acquire_experts`, i.e. per layer use or per chunk of one) for :func:`belady_hit_rate`,
            and the pre-gating predictions (``predictions``: (index into ``routing`` of the next
            request, layer, expert ids)) for :func:`~paddle_semoe.inference.cache_policy.replay`.
    """

    expert_granular = True

    def __init__(self, manifest: Manifest, reader: ExpertReader, num_slots: int, *, beta: float = 0.9,
                 decay_every: int = 1, policy: EvictionPolicy | None = None, record_routing: bool = False,
                 loader_threads: int = 4, trace: bool = False):
        super().__init__(trace)
        if num_slots < 1:
            raise ValueError(f"expert cache needs at least one slot, got num_slots={num_slots}")
        if loader_threads < 1:
            raise ValueError(f"loader_threads must be >= 1, got {loader_threads}")
        geo = ExpertGeometry.of(manifest)
        self.manifest, self.reader, self.geo = manifest, reader, geo
        self.quant = reader.quant  # validated by the reader
        self.num_slots = S = min(num_slots, geo.layers * geo.experts)
        E, D, F = geo.experts, geo.d_model, geo.d_ff
        self._weight_bytes = geo.weight_bytes(self.quant)
        self._w1u = aligned_buffer(S * self._weight_bytes)
        self._w2u = aligned_buffer(S * self._weight_bytes)
        b1_all, b2_all = (_tensor_table(manifest, manifest.sections, b) for b in ("b1", "b2"))
        assert b1_all.shape == (geo.layers, E, F) and b2_all.shape == (geo.layers, E, D)
        self.b1_all = b1_all.astype(np.float32, copy=False)  # every expert's biases, resident
        self.b2_all = b2_all.astype(np.float32, copy=False)
        # int4: two values per byte along the output dim
        wdt, per_byte = {"float32": (np.float32, 1), "int8": (np.int8, 1),
                         "int4": (np.uint8, 2)}[self.quant]
        self.w1 = self._w1u.view(wdt).reshape(S, D, F // per_byte)
        self.w2 = self._w2u.view(wdt).reshape(S, F, D // per_byte)
        self.b1 = np.zeros((S, F), np.float32)
        self.b2 = np.zeros((S, D), np.float32)
        names: tuple[str, ...] = ("w1", "b1", "w2", "b2")
        if self.quant != "float32":  # per-slot copies of the slot's scales
            sh1, sh2 = geo.scale_shapes(self.quant)
            self.s1 = np.ones((S,) + sh1, np.float32)
            self.s2 = np.ones((S,) + sh2, np.float32)
            names += ("s1", "s2")
        self.tensors = {k: paddle.utils.dlpack.from_dlpack(getattr(self, k)) for k in names}
        self._activation = str(manifest.model.get("activation", "gelu"))
        self._ops_backend = manifest.model.get("ops_backend")
        self.policy: EvictionPolicy = policy if policy is not None else LayerDistancePolicy(beta, decay_every=decay_every)
        self.policy.reset(geo.layers, E, S)
        self.stats = ProviderStats()
        self.cache_stats = CacheStats()
        self.record_routing = record_routing
        self.routing: list[tuple[int, tuple[int, ...]]] = []
        self.predictions: list[tuple[int, int, tuple[int, ...]]] = []
        self._key = np.full(S, -1, np.int64)  # slot -> layer * E + expert
        self._slot: dict[int, int] = {}  # key -> slot
        self._pins = np.zeros(S, np.int64)
        self._loading = np.zeros(S, bool)
        self._ready = [threading.Event() for _ in range(S)]
        self._predicted: dict[int, set[int]] = {}
        self._init_loaders(loader_threads, "expert-cache-loader")

    # -- loader thread --------------------------------------------------------------
    def _load_job(self, key: int, slot: int) -> None:
        mb = self._weight_bytes
        j, e = divmod(key, self.geo.experts)
        try:
            self._event("load_start", key, slot)
            t0 = time.perf_counter()
            n = self.reader.read(j, e, self._w1u[slot * mb : (slot + 1) * mb],
                                 self._w2u[slot * mb : (slot + 1) * mb])
            self.b1[slot] = self.b1_all[j, e]
            self.b2[slot] = self.b2_all[j, e]
            if self.quant != "float32":
                self.s1[slot] = self.reader.scale1[j, e]
                self.s2[slot] = self.reader.scale2[j, e]
            dt = time.perf_counter() - t0
            self._event("load_end", key, slot)
        except BaseException as exc:  # surfaced in the compute thread
            self._error = exc
            n, dt = 0, 0.0
        with self._cv:
            self.stats.load_s += dt
            self.stats.loads += 1
            self.stats.bytes_loaded += n
            self._loading[slot] = False
            self._ready[slot].set()
            self._cv.notify_all()

    def _victim(self, speculative_for: int | None = None) -> int | None:
        """An empty free slot, else the slot of the policy's victim among the unpinned, not-loading
        slots (None if there is none or, for a speculative load of key ``speculative_for``, if the
        policy refuses the displacement; a demand load's key is not passed to the policy: -1)."""
        free = np.flatnonzero((self._pins == 0) & ~self._loading)
        if free.size == 0:
            return None
        keys = self._key[free]
        empty = free[keys < 0]
        if empty.size:
            return int(empty[0])
        incoming = -1 if speculative_for is None else speculative_for
        k = self.policy.victim(keys, incoming, speculative_for is not None)
        return None if k is None else self._slot[k]

    def _assign(self, key: int, slot: int, demand: bool) -> None:
        old = int(self._key[slot])
        if old >= 0:
            del self._slot[old]
            self.policy.evicted(old)
        self.policy.inserted(key)
        self._key[slot] = key
        self._slot[key] = slot
        self._loading[slot] = True
        self._ready[slot].clear()
        (self._queue.appendleft if demand else self._queue.append)((key, slot))
        self._cv.notify_all()

    # -- compute side ---------------------------------------------------------------
    def observe(self, j: int, experts: np.ndarray) -> None:
        """MoE layer ``j`` of the current forward uses ``experts`` (sorted ids, nonzero counts):
        tells the eviction policy (which counts the uses and advances its decay clock at the
        start of each forward pass) and scores the layer's pre-gating prediction."""
        keys = np.asarray(experts, np.int64) + j * self.geo.experts
        with self._cv:
            self.policy.record(j, keys)
            pred = self._predicted.pop(j, None)
            if pred is not None:
                used = set(int(e) for e in experts)
                cs = self.cache_stats
                cs.predicted += len(pred)
                cs.predicted_used += len(pred & used)
                cs.used_after_prediction += len(used)

    def acquire_experts(self, j: int, experts: np.ndarray) -> np.ndarray:
        """Pin experts ``experts`` of layer ``j`` (at most ``num_slots``) in slots, loading the
        misses; returns their slot ids (int64, in the order given) once all are loaded."""
        if len(experts) > self.num_slots:
            raise ValueError(f"expert cache: {len(experts)} experts requested at once, only {self.num_slots} slots")
        ids = np.asarray(experts, np.int64)
        keys: list[int] = (ids + j * self.geo.experts).tolist()
        slots = [-1] * len(keys)
        with self._cv:
            misses = []
            for i, key in enumerate(keys):  # pin the hits first so that the misses cannot evict them
                s = self._slot.get(key)
                if s is None:
                    misses.append(i)
                    continue
                self._pins[s] += 1
                slots[i] = s
            for i in misses:
                while (s := self._victim()) is None:  # every free slot is still loading a prefetch
                    if self._error is not None:
                        raise self._error
                    self._cv.wait(timeout=1.0)
                self._assign(keys[i], s, demand=True)
                self._pins[s] += 1
                slots[i] = s
            self.cache_stats.hits += len(keys) - len(misses)
            self.cache_stats.misses += len(misses)
            self.cache_stats.accesses += len(keys)
            if self.record_routing:
                self.routing.append((j, tuple(ids.tolist())))
        t0 = time.perf_counter()
        for s in slots:
            self._ready[s].wait()
        self.stats.wait_s += time.perf_counter() - t0
        if self._error is not None:
            raise self._error
        if self.trace_enabled:
            for key, s in zip(keys, slots):
                self._event("compute_start", key, s)
        return np.array(slots, np.int64)

    def release_experts(self, j: int, slots: np.ndarray) -> None:
        """Unpin the slots :meth:`acquire_experts` returned for layer ``j``. Wakes nobody: the
        only waiter, :meth:`acquire_experts` on this same serving thread, waits for loads."""
        with self._cv:
            if self.trace_enabled:
                for s in slots:
                    self._event("compute_end", int(self._key[s]), int(s))
            self._pins[slots] -= 1  # distinct slots (one per expert requested)

    def prefetch(self, j: int, experts: Sequence[int]) -> None:
        """Pre-gating: layer ``j`` will probably use ``experts``; tells the eviction policy and
        loads the absent ones into slots the policy lets them displace (never a pinned or
        loading slot; the default policy: experts with no more hits, distance-weighted)."""
        if not 0 <= j < self.geo.layers:
            return
        ids = [int(e) for e in experts]
        keys = [j * self.geo.experts + e for e in ids]
        with self._cv:
            self._predicted[j] = set(ids)
            if self.record_routing:
                self.predictions.append((len(self.routing), j, tuple(ids)))
            self.policy.predict(j, keys)
            for key in keys:
                if key in self._slot:
                    continue
                s = self._victim(speculative_for=key)
                if s is not None:
                    self._assign(key, s, demand=False)
                    self.cache_stats.prefetch_loads += 1

    def run_slots(self, rows_RD: paddle.Tensor, counts_S: paddle.Tensor, compute: Callable[..., paddle.Tensor]) -> paddle.Tensor:
        """The grouped FFN over the slot arenas: rows [R, D] in slot order, counts_S int32 [S]
        (zero for slots not in use) -> [R, D]. float32 slots: the layer's own ``compute`` (the
        grouped FFN op training uses); int8 / int4 slots: :func:`paddle_semoe.ops.grouped_ffn_int8`
        / :func:`~paddle_semoe.ops.grouped_ffn_int4` on the quantized weights and per-slot scales,
        with the package model's activation."""
        t = self.tensors
        if self.quant == "int8":
            return ops.grouped_ffn_int8(rows_RD, counts_S, t["w1"], t["s1"], t["b1"], t["w2"], t["s2"], t["b2"],
                                        activation=self._activation, backend=self._ops_backend)
        if self.quant == "int4":
            return ops.grouped_ffn_int4(rows_RD, counts_S, t["w1"], t["s1"], t["b1"], t["w2"], t["s2"], t["b2"],
                                        group_size=INT4_GROUP, activation=self._activation, backend=self._ops_backend)
        return compute(rows_RD, counts_S, t["w1"], t["b1"], t["w2"], t["b2"])

    # -- layer-granular interface (ExpertProvider) -----------------------------------
    def acquire(self, j: int) -> dict[str, paddle.Tensor]:
        raise RuntimeError("the expert cache serves routed experts only (through LayerWeights); "
                           "use mode resident, ring or naive for layer-granular consumers such as Paddle Inference")

    def release(self, j: int) -> None:
        raise RuntimeError("the expert cache has no layer-granular release")

    def resident_expert_bytes(self) -> int:
        """Slot arenas (weights, biases, scales), the resident biases and the reader's scales."""
        scales = self.s1.nbytes + self.s2.nbytes if self.quant != "float32" else 0
        return (self._w1u.nbytes + self._w2u.nbytes + self.b1.nbytes + self.b2.nbytes + scales + self.b1_all.nbytes
                + self.b2_all.nbytes + self.reader.resident_bytes)

    def close(self) -> None:
        self._stop_loaders()
        self.reader.close()


def slots_for_expert_budget(manifest: Manifest, budget_bytes: int, quant: str = "float32") -> int:
    """S = how many single-expert slots fit ``budget_bytes`` after the resident bias table
    (and, for int8, the resident scales). An int8 slot holds int8 weights (a quarter of a
    float32 slot's bytes), so the same budget holds about four times the experts."""
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    geo = ExpertGeometry.of(manifest)
    bias = geo.layers * geo.experts * ((geo.d_model + geo.d_ff) * 4 + geo.scale_bytes(quant))
    slot = geo.quant_slot_bytes(quant)
    s = (budget_bytes - bias) // slot
    if s < 1:
        raise ValueError(
            f"expert memory budget {budget_bytes} B holds no expert slot (one {quant} expert {slot} B + biases {bias} B)"
        )
    return int(min(s, geo.layers * geo.experts))


def routing_requests(routing: Sequence[tuple[int, Sequence[int]]], num_experts: int) -> list[list[int]]:
    """A cache's routing trace -> requests of keys ``layer * E + expert`` for :func:`belady_hit_rate`."""
    return [[j * num_experts + int(e) for e in ids] for j, ids in routing]
