"""Expert-granular serving: a hot-expert cache of single-expert slots, loaded on routing.

A decode step routes each token to k of E experts per MoE layer, so a layer-granular ring
streams all E experts to use a handful. Here the unit is one expert of one layer:

* :class:`DiskExpertReader` / :class:`HostExpertReader` read expert ``e`` of MoE layer ``j``
  (its ``w1[e]`` and ``w2[e]`` rows, see ``Section.expert_range``) straight into a slot;
  disk reads use O_DIRECT when the ranges are 4096-aligned (else an aligned bounce buffer),
  and with ``verify`` every read is checked against the package's per-expert CRC-32.
* :class:`ExpertCache` holds S slots in four arenas ``w1 [S,D,F]``, ``b1 [S,F]``,
  ``w2 [S,F,D]``, ``b2 [S,D]`` (allocated once; the biases of every expert stay resident,
  they are ~0.2% of the bytes). The MoE layer's routing happens before its expert weights
  are needed, so :class:`~paddle_semoe.inference.ring.LayerWeights` hands the cache the ids of
  the experts with nonzero counts; hits are used in place, misses are loaded by the loader
  threads into slots freed by an eviction policy of :mod:`paddle_semoe.inference.cache_policy`
  (default :class:`~paddle_semoe.inference.cache_policy.LayerDistancePolicy`: LFU with decay
  weighted by how soon the expert's layer runs again; the replay harness there measured it
  against the alternatives on recorded decode traces).
  The grouped FFN then runs on the arenas with per-slot counts (rows permuted into slot order),
  so the result is the same op on the same weights: bit-exact with all-resident serving.
* Weight-only int8 (``quant="int8"``, packages exported with ``int8``): the slots hold the int8
  weights as stored (a load reads a quarter of the bytes, straight into the slot) and per-slot
  copies of their per-output-channel scales; the FFN runs
  :func:`paddle_semoe.ops.grouped_ffn_int8`, whose GEMMs read int8 and scale each output once.
  An int8 slot takes a quarter of a float32 slot's bytes, so a budget holds ~4x the experts.
  int4 (``quant="int4"``, exported with ``int4=True``): two values per byte and a scale per
  output channel and group of 32 input rows (an eighth of the bytes, plus ~1/8 for the
  scales), served the same way by :func:`paddle_semoe.ops.grouped_ffn_int4`.
* :meth:`ExpertCache.prefetch` is the pre-gating hook: layer j+1's router applied to layer j's
  input predicts layer j+1's experts, which are loaded while layer j computes (speculative
  loads only displace experts with no more hits than the incoming one).

:func:`belady_hit_rate` replays a routing trace with the offline optimum (evict the expert used
farthest in the future) for comparison with the live hit rate.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import paddle

from paddle_semoe import ops
from paddle_semoe.inference.package import ALIGN, INT4_GROUP, Manifest, PackageError, Section, aligned_buffer
from paddle_semoe.inference.ring import ProviderStats, _Traced
from paddle_semoe.inference.cache_policy import EvictionPolicy, LayerDistancePolicy, belady_hits

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
        if quant == "float32":
            return 0
        a, b = self.scale_shapes(quant)
        return 4 * (int(np.prod(a)) + int(np.prod(b)))

    def quant_slot_bytes(self, quant: str) -> int:
        """Bytes one slot holds for ``quant``: w1, w2, the two bias rows and (int8/int4) the scales."""
        return 2 * self.weight_bytes(quant) + (self.d_ff + self.d_model) * 4 + self.scale_bytes(quant)


# ----------------------------------------------------------------------------- readers
class ExpertReader(Protocol):
    quant: str  # "float32", "int8" or "int4": the bytes ``read`` writes into a slot
    scale1: np.ndarray  # int8/int4 only: float32 [L, E, *scale_shapes[0]] scales of w1 (resident)
    scale2: np.ndarray  # int8/int4 only: float32 [L, E, *scale_shapes[1]] scales of w2

    def read(self, j: int, e: int, w1_out: np.ndarray, w2_out: np.ndarray) -> int:
        """Fill ``w1_out``/``w2_out`` (uint8 views of a slot: D*F float32, int8 or packed int4 values) with
        expert ``e`` of MoE layer ``j``; returns bytes read from the source."""
        ...

    @property
    def resident_bytes(self) -> int:
        """Host memory the reader keeps for serving (e.g. int8 scales)."""
        ...

    def close(self) -> None: ...


QUANTS = ("float32", "int8", "int4")


def _check_crc(manifest: Manifest, sec: Section, e: int, w1: np.ndarray, w2: np.ndarray) -> None:
    if not sec.expert_crc32:
        return
    got = zlib.crc32(w2.data, zlib.crc32(w1.data))
    if got != sec.expert_crc32[e]:
        raise PackageError(
            f"inference package file {manifest.root / sec.file}: expert {e} fails its CRC-32 "
            f"({got:#010x} != {sec.expert_crc32[e]:#010x}); the file is corrupt"
        )


def _tensor_table(manifest: Manifest, sections: tuple[Section, ...], name: str) -> np.ndarray:
    """One small per-expert tensor (a bias or a scale) of every layer, stacked: [L, E, N]."""
    rows = []
    for s in sections:
        t = s.tensor(name)
        with open(manifest.root / s.file, "rb") as f:
            f.seek(t.offset)
            rows.append(np.frombuffer(f.read(t.nbytes), dtype=np.dtype(t.dtype)).reshape(t.shape))
    return np.stack(rows)


class _ExpertReaderBase:
    """Reads expert ``e`` of layer ``j`` straight into a slot: float32 sections into a float32
    slot, int8 / int4 sections (``quant="int8"`` / ``"int4"``) into an int8 / packed-int4 slot,
    as stored (no staging, no dequantization: the quantized expert FFN reads them; their scales
    stay resident in ``scale1``/``scale2``)."""

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
            self.scale1 = _tensor_table(manifest, self.sections, "w1_scale")  # [L, E, *scale_shapes[0]]
            self.scale2 = _tensor_table(manifest, self.sections, "w2_scale")  # [L, E, *scale_shapes[1]]
            want = tuple((self.geo.layers, self.geo.experts) + sh for sh in self.geo.scale_shapes(quant))
            if (self.scale1.shape, self.scale2.shape) != want:
                raise PackageError(f"package {manifest.root}: {quant} scales {self.scale1.shape} / {self.scale2.shape}, "
                                   f"expected {want[0]} / {want[1]}")
        else:
            self.sections = manifest.sections
        self._local = threading.local()  # per loader thread: the O_DIRECT bounce buffer

    def _bounce(self) -> np.ndarray:
        """This thread's O_DIRECT bounce buffer (for expert ranges that are not 4096-aligned)."""
        b = getattr(self._local, "bounce", None)
        if b is None:
            b = self._local.bounce = aligned_buffer(self.geo.weight_bytes(self.quant) + 2 * ALIGN)
        return b

    def _fetch(self, j: int, off: int, out: np.ndarray) -> None:
        raise NotImplementedError

    def _before(self, j: int) -> None:
        pass

    def _after(self, j: int) -> None:
        pass

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
        self._before(j)
        n = 0
        for name, out in (("w1", w1_out), ("w2", w2_out)):
            off, nb = sec.expert_range(name, e)
            self._fetch(j, off, out[:nb])
            n += nb
        self._after(j)
        if self.verify:
            _check_crc(self.manifest, sec, e, w1_out[: n // 2], w2_out[: n // 2])
        return n

    def close(self) -> None:
        pass


class DiskExpertReader(_ExpertReaderBase):
    """Reads single experts from the section files (one open descriptor per file).

    Args:
        direct: O_DIRECT (the page cache never serves a read); where the file system refuses
            it, buffered reads followed by dropping the file's page cache (logged once).
        verify: check each expert read against the manifest's per-expert CRC-32.
        quant: ``float32``, ``int8`` or ``int4`` sections.
    """

    def __init__(self, manifest: Manifest, direct: bool = True, verify: bool = False, quant: str = "float32"):
        super().__init__(manifest, quant, verify)
        self.direct = direct
        self._paths = [manifest.root / s.file for s in self.sections]
        self._stamps = []
        for p in self._paths:
            st = p.stat()
            self._stamps.append((st.st_size, st.st_mtime_ns))
        self._fds: list[int | None] = [None] * len(self._paths)
        self._fadvise = False
        self._warned_bounce = False
        self._open_lock = threading.Lock()

    def _fd(self, j: int) -> int:
        fd = self._fds[j]
        if fd is not None:
            return fd
        with self._open_lock:
            return self._open(j)

    def _open(self, j: int) -> int:
        fd = self._fds[j]
        if fd is None:
            flags = os.O_RDONLY
            if self.direct and not self._fadvise:
                flags |= getattr(os, "O_DIRECT", 0)
            try:
                fd = os.open(self._paths[j], flags)
            except OSError:
                if not self.direct:
                    raise
                self._fadvise = True
                logger.warning("O_DIRECT refused for %s; reading buffered and dropping its page cache instead", self._paths[j])
                fd = os.open(self._paths[j], os.O_RDONLY)
            self._fds[j] = fd
        return fd

    def _before(self, j: int) -> None:
        try:
            st = self._paths[j].stat()
        except FileNotFoundError as exc:
            raise PackageError(f"inference package file disappeared: {self._paths[j]}") from exc
        if (st.st_size, st.st_mtime_ns) != self._stamps[j]:
            raise PackageError(f"inference package file {self._paths[j]} changed after it was verified; refusing to serve it")

    def _after(self, j: int) -> None:
        if self._fadvise:
            os.posix_fadvise(self._fd(j), 0, 0, os.POSIX_FADV_DONTNEED)

    def _fetch(self, j: int, offset: int, out: np.ndarray) -> None:
        fd = self._fd(j)
        n = out.nbytes
        aligned = offset % ALIGN == 0 and n % ALIGN == 0 and out.ctypes.data % ALIGN == 0
        if aligned or not self.direct or self._fadvise:
            target, start, length = out, offset, n
        else:  # O_DIRECT needs aligned offset, length and address: read the covering pages
            if not self._warned_bounce:
                logger.info("expert ranges of %s are not 4096-aligned; O_DIRECT reads go through a bounce buffer", self._paths[j])
                self._warned_bounce = True
            start = offset // ALIGN * ALIGN
            length = (offset + n + ALIGN - 1) // ALIGN * ALIGN - start
            target = self._bounce()[:length]
        mv = target.data.cast("B")
        done = 0
        while done < length:
            got = os.preadv(fd, [mv[done:length]], start + done)
            if got <= 0:
                raise PackageError(f"inference package file {self._paths[j]} ended at byte {start + done}")
            done += got
        if target is not out:
            np.copyto(out, target[offset - start : offset - start + n])

    def close(self) -> None:
        for i, fd in enumerate(self._fds):
            if fd is not None:
                os.close(fd)
                self._fds[i] = None


class HostExpertReader(_ExpertReaderBase):
    """Every section in host memory (read once); a load is a copy."""

    def __init__(self, manifest: Manifest, verify: bool = False, quant: str = "float32"):
        super().__init__(manifest, quant, verify)
        self.buffers = [np.fromfile(manifest.root / s.file, dtype=np.uint8) for s in self.sections]

    def _fetch(self, j: int, off: int, out: np.ndarray) -> None:
        np.copyto(out, self.buffers[j][off : off + out.nbytes])


def _biases(manifest: Manifest, geo: ExpertGeometry) -> tuple[np.ndarray, np.ndarray]:
    """b1 [L, E, F] and b2 [L, E, D] of every MoE layer (kept resident)."""
    b1 = _tensor_table(manifest, manifest.sections, "b1").astype(np.float32, copy=False)
    b2 = _tensor_table(manifest, manifest.sections, "b2").astype(np.float32, copy=False)
    assert b1.shape == (geo.layers, geo.experts, geo.d_ff) and b2.shape == (geo.layers, geo.experts, geo.d_model)
    return b1, b2


# ----------------------------------------------------------------------------- the cache
@dataclass
class CacheStats:
    accesses: int = 0  # (layer, expert) uses requested by forwards
    hits: int = 0  # ... found in a slot (loaded or in flight)
    prefetch_hits: int = 0  # ... of which a prefetch brought in (first use after the prefetch)
    misses: int = 0
    evictions: int = 0
    prefetch_loads: int = 0  # speculative loads issued
    prefetch_skipped: int = 0  # predicted experts not loaded (no displaceable slot)
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
        """1 - loads / requests: every load counted, wasted prefetches included; the quantity
        Belady's MIN (:func:`belady_hit_rate`) maximizes, comparable with it with or without
        prefetch (the live hit rate counts a prefetched expert as a hit, MIN cannot prefetch)."""
        return 1.0 - self.loads / self.accesses if self.accesses else 0.0

    @property
    def prediction_precision(self) -> float:
        """Share of predicted experts the layer used."""
        return self.predicted_used / self.predicted if self.predicted else 0.0

    @property
    def prediction_recall(self) -> float:
        """Share of used experts that were predicted."""
        return self.predicted_used / self.used_after_prediction if self.used_after_prediction else 0.0


class ExpertCache(_Traced):
    """S single-expert slots over every MoE layer, a pluggable eviction policy (default LFU with
    decay weighted by layer distance), asynchronous loader threads.

    Args:
        manifest: the package.
        reader: where experts come from (:class:`DiskExpertReader` or :class:`HostExpertReader`).
        num_slots: S, experts held at once (>= 1).
        beta, decay_every: LFU decay of the default policy: hit counters are multiplied by
            ``beta`` every ``decay_every`` forward passes.
        policy: the eviction policy (:class:`~paddle_semoe.inference.cache_policy.EvictionPolicy`,
            reset to this cache's geometry; it is told every layer use, prediction, load and
            eviction, as :func:`~paddle_semoe.inference.cache_policy.replay` tells it, so a replay
            of the recorded trace reproduces the cache's demand hits, as long as no layer uses
            more experts than there are slots); None:
            ``LayerDistancePolicy(beta, decay_every=decay_every)``.
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
        self.quant = reader.quant
        if self.quant not in QUANTS:
            raise ValueError(f"expert reader quant must be one of {QUANTS}, got {self.quant!r}")
        self.num_slots = S = min(num_slots, geo.layers * geo.experts)
        E, D, F = geo.experts, geo.d_model, geo.d_ff
        self._weight_bytes = geo.weight_bytes(self.quant)
        self._w1u = aligned_buffer(S * self._weight_bytes)
        self._w2u = aligned_buffer(S * self._weight_bytes)
        self.b1_all, self.b2_all = _biases(manifest, geo)
        if self.quant == "int4":  # two values per byte along the output dim
            self.w1 = self._w1u.reshape(S, D, F // 2)
            self.w2 = self._w2u.reshape(S, F, D // 2)
        else:
            wdt = np.int8 if self.quant == "int8" else np.float32
            self.w1 = self._w1u.view(wdt).reshape(S, D, F)
            self.w2 = self._w2u.view(wdt).reshape(S, F, D)
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
        self._by_prefetch = np.zeros(S, bool)
        self._ready = [threading.Event() for _ in range(S)]
        self._queue: deque[tuple[int, int]] = deque()
        self._predicted: dict[int, set[int]] = {}
        self._cv = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._loaders = [threading.Thread(target=self._run, name=f"expert-cache-loader-{i}", daemon=True)
                         for i in range(loader_threads)]
        for t in self._loaders:
            t.start()

    # -- loader thread --------------------------------------------------------------
    def _run(self) -> None:
        mb = self._weight_bytes
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                key, slot = self._queue.popleft()
            j, e = divmod(key, self.geo.experts)
            try:
                self._event("load_start", key, slot)
                t0 = time.perf_counter()
                n = self.reader.read(j, e, self._w1u[slot * mb : (slot + 1) * mb], self._w2u[slot * mb : (slot + 1) * mb])
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

    def _victim(self, speculative_for: int | None = None, incoming: int = -1) -> int | None:
        """An empty free slot, else the slot of the policy's victim among the unpinned, not-loading
        slots (None if there is none or, for a speculative load of key ``speculative_for``, if the
        policy refuses the displacement). ``incoming``: the key a demand load brings (-1: unknown)."""
        free = np.flatnonzero((self._pins == 0) & ~self._loading)
        if free.size == 0:
            return None
        keys = self._key[free]
        empty = free[keys < 0]
        if empty.size:
            return int(empty[0])
        if speculative_for is not None:
            k = self.policy.victim(keys, speculative_for, True)
        else:
            k = self.policy.victim(keys, incoming, False)
        return None if k is None else self._slot[k]

    def _assign(self, key: int, slot: int, demand: bool) -> None:
        old = int(self._key[slot])
        if old >= 0:
            del self._slot[old]
            self.policy.evicted(old)
            self.cache_stats.evictions += 1
        self.policy.inserted(key)
        self._key[slot] = key
        self._slot[key] = slot
        self._loading[slot] = True
        self._by_prefetch[slot] = not demand
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
        cs = self.cache_stats
        pins, by_prefetch = self._pins, self._by_prefetch
        with self._cv:
            misses = []
            for i, key in enumerate(keys):  # pin the hits first so that the misses cannot evict them
                s = self._slot.get(key)
                if s is None:
                    misses.append(i)
                    continue
                pins[s] += 1
                slots[i] = s
                if by_prefetch[s]:
                    cs.prefetch_hits += 1
                    by_prefetch[s] = False
            for i in misses:
                while (s := self._victim()) is None:  # every free slot is still loading a prefetch
                    if self._error is not None:
                        raise self._error
                    self._cv.wait(timeout=1.0)
                self._assign(keys[i], s, demand=True)
                pins[s] += 1
                slots[i] = s
            cs.hits += len(keys) - len(misses)
            cs.misses += len(misses)
            cs.accesses += len(keys)
            if self.record_routing:
                self.routing.append((j, tuple(ids.tolist())))
        t0 = time.perf_counter()
        for s in slots:
            ready = self._ready[s]
            if not ready.is_set():
                ready.wait()
        self.stats.wait_s += time.perf_counter() - t0
        if self._error is not None:
            raise self._error
        if self.trace_enabled:
            for key, s in zip(keys, slots):
                self._event("compute_start", key, s)
        return np.array(slots, np.int64)

    def release_experts(self, j: int, slots: np.ndarray) -> None:
        """Unpin the slots :meth:`acquire_experts` returned for layer ``j``.

        Wakes nobody: the only waiter for a slot is :meth:`acquire_experts` on the serving thread
        (the one that also releases: a forward runs its layers in order on one thread), and it
        waits for loads in flight, which the loaders signal. A ``notify_all`` here woke every
        idle loader thread once per MoE layer, a GIL hand-off each, for nothing."""
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
                if s is None:
                    self.cache_stats.prefetch_skipped += 1
                    continue
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
        """Slot arenas (with their bias and, for int8/int4, scale rows) plus the resident bias table
        (and the reader's resident scales)."""
        scales = self.s1.nbytes + self.s2.nbytes if self.quant != "float32" else 0
        return (self._w1u.nbytes + self._w2u.nbytes + self.b1.nbytes + self.b2.nbytes + scales + self.b1_all.nbytes
                + self.b2_all.nbytes + self.reader.resident_bytes)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._loaders:
            t.join(timeout=10)
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


# ----------------------------------------------------------------------------- offline optimum
def belady_hit_rate(requests: Sequence[Sequence[int]], capacity: int, start: int = 0) -> float:
    """Hit rate of the offline-optimal cache (Belady/MIN) on a trace of requests.

    Each request is the set of keys one layer use needs at once (all must be resident
    together, so they cannot evict each other); a miss evicts the resident key whose next use
    is farthest in the future (never). ``capacity`` >= the largest request. Requests before
    ``start`` are replayed (they warm the cache) but not counted; MIN is optimal for every
    prefix, so the window's count is the optimum's. Pure function
    (:func:`~paddle_semoe.inference.cache_policy.belady_hits`).
    """
    hits = belady_hits(requests, capacity)
    total = sum(len(set(r)) for r in requests[start:])
    return sum(hits[start:]) / total if total else 0.0


def routing_requests(routing: Sequence[tuple[int, Sequence[int]]], num_experts: int) -> list[list[int]]:
    """A cache's routing trace -> requests of keys ``layer * E + expert`` for :func:`belady_hit_rate`."""
    return [[j * num_experts + int(e) for e in ids] for j, ids in routing]
