"""Host tier accounting: loads, LFU eviction with write-back, flush, prefetch admission,
eviction ahead of need, and worker errors surfacing in the caller."""

import mmap
import time

import numpy as np
import pytest

from paddle_semoe.storage.cache import PREFETCH, HostCache
from paddle_semoe.storage.layout import ExpertStateLayout
from paddle_semoe.storage.policy import LFUDecayPolicy
from paddle_semoe.storage.ssd import SSDTier, StorageError, state_file_name
from paddle_semoe.storage.stats import StorageStats

LAYOUT = ExpertStateLayout(d_model=8, d_ff=16)
KEYS = 6


def _setup(tmp_path, slots=3, threshold=1.0):
    ssd = SSDTier(tmp_path, LAYOUT)
    buf = mmap.mmap(-1, LAYOUT.slot_bytes)
    arr = np.frombuffer(buf, dtype=np.float32)
    for k in range(KEYS):
        arr[:] = k
        ssd.write(0, k, memoryview(buf), seq=0, writeback=False)
    stats = StorageStats()
    policy = LFUDecayPolicy(KEYS, beta=0.5, decay_every=100, threshold=threshold)
    cache = HostCache(LAYOUT, slots, ssd, policy, lambda key: (0, key), stats)
    return ssd, cache, stats


def _use(cache, key, write=False, value=None):
    cache.record_hits([key])
    e, hit, _ = cache.acquire(key, write=write)
    try:
        data = cache.slot_floats(e)
        first = float(data[0])
        if value is not None:
            data[:] = value
    finally:
        cache.release(e, dirty=value is not None)
    return hit, first


def _wait(pred, what, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_loads_hits_eviction_and_write_back(tmp_path):
    ssd, cache, stats = _setup(tmp_path)
    try:
        assert _use(cache, 0) == (False, 0.0)  # miss: loaded from SSD
        assert _use(cache, 0, write=True, value=100.0) == (True, 0.0)  # hit; now dirty
        _use(cache, 0)
        _use(cache, 1)
        _use(cache, 2)
        t = stats.totals()
        assert t["loads"] == 3 and t["ssd_read_bytes"] == 3 * ssd.file_bytes and t["evictions"] == 0
        assert cache.used_slots == 3 and cache.resident_bytes() == 3 * LAYOUT.slot_bytes
        assert cache.dirty_keys() == [0]
        # full: key 3 displaces the least-hit entry (1: one hit, used before 2), clean -> no write
        assert _use(cache, 3) == (False, 3.0)
        assert not cache.cached(1) and cache.cached(0)
        assert stats.totals()["evictions"] == 1 and stats.totals()["writebacks"] == 0
        # key 0 (3 hits, dirty) survives until it is the least-hit one
        for k in (2, 3, 2, 3, 2, 3):
            _use(cache, k)
        _use(cache, 4)
        assert not cache.cached(0)
        t = stats.totals()
        assert t["writebacks"] == 1 and t["ssd_write_bytes"] == ssd.file_bytes
        # the written-back state is what the optimizer left in the slot
        assert _use(cache, 0) == (False, 100.0)
    finally:
        cache.close()


def test_flush_writes_every_dirty_entry_and_keeps_it_cached(tmp_path):
    ssd, cache, stats = _setup(tmp_path)
    try:
        for k in (0, 1):
            _use(cache, k, write=True, value=10.0 + k)
        cache.write_seq = 42
        cache.flush()
        assert cache.dirty_keys() == [] and cache.cached(0) and cache.cached(1)
        assert stats.totals()["writebacks"] == 2
        assert [i.seq for i in ssd.verify_all([(0, 0), (0, 1)])] == [42, 42]
    finally:
        cache.close()


def test_prefetch_does_not_displace_a_hotter_entry(tmp_path):
    _, cache, stats = _setup(tmp_path, slots=2)
    try:
        for k in (0, 0, 1, 1):
            _use(cache, k)
        cache.request([5], PREFETCH)
        _wait(lambda: stats.totals()["prefetch_dropped"] == 1, "the prefetch to be dropped")
        assert not cache.cached(5) and cache.cached(0) and cache.cached(1)
        cache.record_hits([5, 5, 5])  # now hotter than both
        cache.request([5], PREFETCH)
        _wait(lambda: cache.cached(5), "the prefetch to load")
        assert stats.totals()["prefetch_loads"] == 1
        assert _use(cache, 5)[0] is True and stats.totals()["prefetch_used"] == 1
    finally:
        cache.close()


def test_eviction_ahead_of_need_down_to_the_watermark(tmp_path):
    _, cache, stats = _setup(tmp_path, slots=4, threshold=0.5)
    try:
        cache.protect({0, 1, 2, 3})
        for k in range(4):
            _use(cache, k, write=True, value=1.0)
        time.sleep(0.05)
        assert cache.used_slots == 4  # protected: nothing is evicted ahead
        cache.protect(set())
        _wait(lambda: cache.used_slots == 2, "eviction down to the watermark")
        assert stats.totals()["writebacks"] == 2  # the evicted entries were dirty
    finally:
        cache.close()


def test_a_corrupt_file_fails_the_caller_with_its_name(tmp_path):
    ssd, cache, _ = _setup(tmp_path)
    try:
        path = tmp_path / state_file_name(0, 4)
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
        with pytest.raises(StorageError, match="l000_e000004.bin is corrupt"):
            cache.acquire(4)
        assert _use(cache, 1) == (False, 1.0)  # the cache keeps working
    finally:
        cache.close()


def test_too_small_a_cache_is_refused():
    with pytest.raises(ValueError, match="raise storage.host_cache_mb"):
        HostCache(LAYOUT, 1, None, LFUDecayPolicy(2, 0.5, 1), lambda k: (0, k), StorageStats())
