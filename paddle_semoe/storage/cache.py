"""The host tier: a fixed pool of expert-state slots, and the worker thread that fills it.

The pool is one anonymous mapping of ``num_slots * slot_bytes`` (page-aligned, so slots are
O_DIRECT buffers and the SSD tier reads and writes them without a copy); memory becomes
resident as slots are first used, and never grows past the pool.

Entry states::

    LOADING   a read from SSD is filling the slot (not usable)
    READY     valid; may be pinned for reading (compute copy) or writing (optimizer update)
    WRITING   valid, a periodic write-back is reading it: may be read, not modified
    EVICTING  being written back before its slot is reused: gone for the caller

One background thread (``semoe-storage-io``) serves a priority queue of loads (``URGENT``: the
main thread waits for it; ``OPTIM``: the optimizer's next; ``PREFETCH``: predicted) and flushes.
When idle it evicts least-hit entries above the policy's watermark and writes back ("cleans")
dirty entries among the least-hit ``clean_ahead`` fraction, so a miss waits for a read only. A
prefetch is dropped when it would displace a hotter (or protected) entry, or once expired (the
owner bumps the epoch at every MoE layer; a prefetch ``k`` layers ahead lives ``k`` epochs).

The main thread pins one entry at a time (:meth:`HostCache.acquire` ... :meth:`release`), so
the worker always finds a victim when the pool has at least two slots. Errors raised in the
worker (a corrupt file, a full disk) are re-raised in the main thread at its next call.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import mmap
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from paddle_semoe.storage.layout import ExpertStateLayout
from paddle_semoe.storage.policy import LFUDecayPolicy
from paddle_semoe.storage.ssd import SSDTier, StorageError
from paddle_semoe.storage.stats import StorageStats

logger = logging.getLogger(__name__)

URGENT, OPTIM, PREFETCH = 0, 1, 2
FLUSH_NOW = -1  # a checkpoint waits for it: before anything else
FLUSH_IDLE = 3  # periodic write-back: after every load


class EntryState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    WRITING = "writing"
    EVICTING = "evicting"


@dataclass
class Entry:
    key: int
    slot: int
    state: EntryState
    dirty: bool = False
    pins: int = 0
    prefetched: bool = False  # loaded by a prediction and not used yet


@dataclass(order=True)
class _Request:
    prio: int
    seq: int
    key: int = field(compare=False)
    expires: int = field(compare=False, default=0)  # a prefetch is dropped once the epoch is past this
    done: threading.Event | None = field(compare=False, default=None)


class HostCache:
    """Expert-state slots in host memory with LFU-with-decay replacement.

    Args:
        layout: expert state layout (slot size).
        num_slots: capacity in expert states (>= 2).
        ssd: the SSD tier behind it.
        policy: hit table and victim choice.
        locate: key -> (layer, global expert) for file names.
        stats: counters to update.
        clean_ahead: fraction of the slots, least-hit first, kept clean by idle-time write-backs.
    """

    def __init__(
        self,
        layout: ExpertStateLayout,
        num_slots: int,
        ssd: SSDTier,
        policy: LFUDecayPolicy,
        locate: Callable[[int], tuple[int, int]],
        stats: StorageStats,
        clean_ahead: float = 0.0,
    ):
        if num_slots < 2:
            raise ValueError(
                f"the host cache must hold at least 2 expert states ({2 * layout.slot_bytes / 2**20:.1f} MiB); "
                f"got room for {num_slots}: raise storage.host_cache_mb"
            )
        self.slot_bytes = layout.slot_bytes
        self.num_slots = num_slots
        self.ssd = ssd
        self.policy = policy
        self.locate = locate
        self.stats = stats
        if not 0.0 <= clean_ahead <= 1.0:
            raise ValueError(f"clean_ahead must be in [0, 1], got {clean_ahead}")
        self.clean_count = int(clean_ahead * num_slots)
        self._pool = mmap.mmap(-1, num_slots * self.slot_bytes)
        self._floats = np.frombuffer(self._pool, dtype=np.float32)
        self._entries: dict[int, Entry] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._seq = itertools.count()
        self._protected: frozenset[int] = frozenset()
        self._error: BaseException | None = None
        self._closed = False
        self._busy = False
        self.epoch = 0
        self.write_seq = 0  # recorded in written headers (the owner sets it to the optimizer step)
        self._thread = threading.Thread(target=self._run, name="semoe-storage-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ slots
    def slot_floats(self, entry: Entry) -> np.ndarray:
        """The slot of ``entry`` as float32 [3 * numel (+ padding)]."""
        n = self.slot_bytes // 4
        return self._floats[entry.slot * n : (entry.slot + 1) * n]

    def _slot_bytes_view(self, slot: int) -> memoryview:
        return memoryview(self._pool)[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]

    @property
    def used_slots(self) -> int:
        with self._cond:
            return len(self._entries)

    def resident_bytes(self) -> int:
        """Bytes of slots holding a state (the pool's touched part can be larger)."""
        return self.used_slots * self.slot_bytes

    def cached(self, key: int) -> bool:
        with self._cond:
            e = self._entries.get(key)
            return e is not None and e.state in (EntryState.READY, EntryState.WRITING)

    def dirty_keys(self) -> list[int]:
        with self._cond:
            return sorted(k for k, e in self._entries.items() if e.dirty)

    # ------------------------------------------------------------------ main-thread API
    def _raise_worker_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, StorageError):
                raise StorageError(str(err)) from err
            raise StorageError(f"expert storage worker failed: {err!r}") from err

    def request(self, keys: Iterable[int], prio: int, ahead: int = 1) -> None:
        """Queue loads of ``keys`` (no-op for keys already cached or loading); a prefetch stays
        valid for ``ahead`` more epochs."""
        with self._cond:
            self._raise_worker_error()
            entries = self._entries
            new = [k for k in keys if k not in entries or entries[k].state == EntryState.EVICTING]
            for k in new:
                heapq.heappush(self._queue, _Request(prio, next(self._seq), k, self.epoch + ahead))
            if new:
                self._cond.notify_all()

    def record_hits(self, keys: Iterable[int]) -> None:
        """Count one use of each key in the hit table."""
        with self._cond:
            self.policy.record(keys)

    def tick(self) -> bool:
        """One optimizer step passed (the hit table decays every K ticks)."""
        with self._cond:
            return self.policy.tick()

    def protect(self, keys: Iterable[int]) -> None:
        """Keys the owner will need soon: evicted only when nothing else can be."""
        with self._cond:
            self._protected = frozenset(keys)
            self._cond.notify_all()  # the worker may now evict what is no longer protected

    def next_epoch(self) -> None:
        with self._cond:
            self.epoch += 1

    def acquire(self, key: int, *, write: bool = False) -> tuple[Entry, bool, float]:
        """Pin ``key``'s entry, loading it first if needed (urgently).

        Returns ``(entry, hit, waited_s)``: ``hit`` is True when it was usable at once.
        ``write=True`` waits until no write-back is reading the slot.
        """
        t0 = time.perf_counter()
        hit = True
        with self._cond:
            while True:
                self._raise_worker_error()
                e = self._entries.get(key)
                if e is not None and (e.state == EntryState.READY or (e.state == EntryState.WRITING and not write)):
                    e.pins += 1
                    if e.prefetched:
                        e.prefetched = False
                        self.stats.add(prefetch_used=1)
                    return e, hit, 0.0 if hit else time.perf_counter() - t0
                hit = False
                if e is None or e.state == EntryState.EVICTING:
                    if not any(r.key == key and r.prio == URGENT for r in self._queue):
                        heapq.heappush(self._queue, _Request(URGENT, next(self._seq), key, self.epoch + 1))
                        self._cond.notify_all()
                self._cond.wait(timeout=1.0)

    def release(self, entry: Entry, *, dirty: bool = False) -> None:
        with self._cond:
            entry.pins -= 1
            entry.dirty = entry.dirty or dirty
            self._cond.notify_all()

    def flush(self) -> None:
        """Write back every dirty entry and wait until they are on SSD (entries stay cached)."""
        done = threading.Event()
        with self._cond:
            self._raise_worker_error()
            heapq.heappush(self._queue, _Request(FLUSH_NOW, next(self._seq), -1, self.epoch + 1, done))
            self._cond.notify_all()
        while not done.wait(timeout=1.0):
            with self._cond:
                self._raise_worker_error()
        with self._cond:
            self._raise_worker_error()

    def request_flush(self) -> None:
        """Queue a write-back of every dirty entry without waiting (periodic write-back)."""
        with self._cond:
            heapq.heappush(self._queue, _Request(FLUSH_IDLE, next(self._seq), -1, self.epoch + 1))
            self._cond.notify_all()

    def drop_all(self) -> None:
        """Forget every entry without writing anything back (after the SSD tier was replaced)."""
        with self._cond:
            self._queue.clear()
            self._protected = frozenset()
            while any(e.pins for e in self._entries.values()) or self._busy:
                self._cond.wait(timeout=0.1)
            self._entries.clear()
            self._free = list(range(self.num_slots - 1, -1, -1))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            with self._cond:
                clean = None
                while not self._queue and not self._closed and not self._want_evict_ahead():
                    clean = self._clean_candidate()
                    if clean is not None:
                        clean.state = EntryState.WRITING
                        break
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                if self._closed:  # (a clean candidate is only taken while open)
                    self._busy = False
                    self._cond.notify_all()
                    return
                self._busy = True
                req = heapq.heappop(self._queue) if self._queue and clean is None else None
            try:
                if clean is not None:
                    try:
                        self._write_back(clean)
                        self.stats.add(cleaned=1)
                    finally:
                        with self._cond:
                            clean.state = EntryState.READY
                            self._cond.notify_all()
                elif req is None:
                    self._evict_one(ahead=True)
                elif req.prio in (FLUSH_NOW, FLUSH_IDLE):
                    self._flush_step(req)
                else:
                    self._load(req)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                logger.error("expert storage worker: %s", exc)
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                if req is not None and req.done is not None:
                    req.done.set()

    def _clean_candidate(self) -> Entry | None:
        """A dirty, idle, unprotected entry among the ``clean_count`` least-hit ones (or None)."""
        if not self.clean_count:
            return None
        ready = [k for k, e in self._entries.items() if e.state == EntryState.READY]
        ready.sort(key=self.policy.eviction_order)
        for k in ready[: self.clean_count]:
            e = self._entries[k]
            if e.dirty and e.pins == 0 and k not in self._protected:
                return e
        return None

    def _want_evict_ahead(self) -> bool:
        over = self.policy.over_watermark(len(self._entries), self.num_slots)
        return over and bool(self._candidates(False))

    def _candidates(self, allow_protected: bool) -> list[int]:
        return [
            k for k, e in self._entries.items()
            if e.state == EntryState.READY and e.pins == 0 and (allow_protected or k not in self._protected)
        ]

    def _evict_one(self, ahead: bool = False, incoming: int | None = None, urgent: bool = False) -> int | None:
        """Free one slot (writing the victim back when dirty); returns the slot or None."""
        with self._cond:
            victim = self.policy.victim(self._candidates(False))
            if victim is None and urgent:
                victim = self.policy.victim(self._candidates(True))
            if victim is None:
                return None
            if incoming is not None and not urgent and not self.policy.may_displace(incoming, victim):
                return None
            e = self._entries[victim]
            needs_write = e.dirty
            e.state = EntryState.EVICTING
        if needs_write:
            self._write_back(e)
        with self._cond:
            del self._entries[victim]
            self.stats.add(evictions=1)
            if ahead:
                self._free.append(e.slot)
            self._cond.notify_all()
            return e.slot

    def _write_back(self, e: Entry) -> None:
        layer, expert = self.locate(e.key)
        t0 = time.perf_counter()
        info = self.ssd.write(layer, expert, self._slot_bytes_view(e.slot), self.write_seq)
        with self._cond:
            e.dirty = False
        self.stats.add(ssd_write_bytes=info.bytes, writebacks=1, io_write_s=time.perf_counter() - t0)

    def _flush_step(self, req: _Request) -> None:
        """Write back one dirty entry; re-queue the flush while dirty entries remain, so loads
        queued meanwhile (with a higher priority) are not held up by a long flush."""
        with self._cond:
            dirty = [k for k in self._candidates(True) if self._entries[k].dirty]
            if not dirty:
                if any(e.dirty for e in self._entries.values()):  # pinned: retry after the owner releases it
                    self._cond.wait(timeout=0.01)
                    heapq.heappush(self._queue, _Request(req.prio, next(self._seq), -1, req.expires, req.done))
                elif req.done is not None:
                    req.done.set()
                return
            e = self._entries[min(dirty)]
            e.state = EntryState.WRITING
        try:
            self._write_back(e)
        finally:
            with self._cond:
                e.state = EntryState.READY
                heapq.heappush(self._queue, _Request(req.prio, next(self._seq), -1, req.expires, req.done))
                self._cond.notify_all()

    def _load(self, req: _Request) -> None:
        key = req.key
        with self._cond:
            if key in self._entries:
                return
            if req.prio == PREFETCH and self.epoch > req.expires:
                self.stats.add(prefetch_dropped=1)
                return
            slot = self._free.pop() if self._free else None
        while slot is None:
            slot = self._evict_one(incoming=key, urgent=req.prio != PREFETCH)
            if slot is None:
                if req.prio == PREFETCH:
                    self.stats.add(prefetch_dropped=1)
                    return
                with self._cond:  # everything pinned for a moment: wait for a release
                    self._cond.wait(timeout=0.05)
                    slot = self._free.pop() if self._free else None
        with self._cond:  # only this worker adds entries: the key is still absent
            entry = Entry(key, slot, EntryState.LOADING)
            self._entries[key] = entry
        layer, expert = self.locate(key)
        t0 = time.perf_counter()
        try:
            info = self.ssd.read(layer, expert, self._slot_bytes_view(slot))
        except BaseException:
            with self._cond:
                del self._entries[key]
                self._free.append(slot)
            raise
        with self._cond:
            entry.state = EntryState.READY
            entry.prefetched = req.prio == PREFETCH
            self._cond.notify_all()
        self.stats.add(
            ssd_read_bytes=info.bytes, loads=1, prefetch_loads=int(req.prio == PREFETCH), io_read_s=time.perf_counter() - t0
        )
