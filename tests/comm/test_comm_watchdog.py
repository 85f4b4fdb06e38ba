"""The collective watchdog and error wrapping (in-process; the multi-process case is in tests/dist)."""

from __future__ import annotations

import time

import pytest

from paddle_semoe.comm import CollectiveWatchdog, CommError


def test_watchdog_fires_with_the_collective_group_and_peer() -> None:
    fired: list[str] = []
    wd = CollectiveWatchdog(0.2, rank=3, on_timeout=fired.append)
    with wd.guard("exchange_rows[pairwise recv]", "ep[ranks 2,3]", "2"):
        time.sleep(0.7)
    assert len(fired) == 1
    assert "rank 3" in fired[0]
    assert "exchange_rows[pairwise recv] on group ep[ranks 2,3] with peer 2" in fired[0]
    assert "0.2s" in fired[0]
    wd.close()


def test_watchdog_is_quiet_for_fast_calls_and_rearms() -> None:
    fired: list[str] = []
    wd = CollectiveWatchdog(0.3, rank=0, on_timeout=fired.append)
    for _ in range(5):
        with wd.guard("all_reduce", "dp[ranks 0,1]"):
            time.sleep(0.1)
    time.sleep(0.4)
    assert fired == []
    wd.close()


def test_guard_wraps_backend_errors() -> None:
    wd = CollectiveWatchdog(None, rank=1)
    with pytest.raises(CommError, match=r"rank 1: all_gather_counts on group ep\[ranks 0,1\] with peer any failed: .*reset"):
        with wd.guard("all_gather_counts", "ep[ranks 0,1]"):
            raise RuntimeError("Read error: Connection reset by peer")


def test_disabled_watchdog_has_no_thread() -> None:
    wd = CollectiveWatchdog(0, rank=0)
    with wd.guard("x", "g"):
        pass
    assert wd.timeout_s is None and wd._thread is None
