"""Busy / idle accounting from per-rank phase times."""

from __future__ import annotations

import numpy as np

from paddle_semoe.elastic.timing import COLUMNS, StepTimer, idle_from_sync, summarize_steps


def test_idle_is_sync_minus_the_steps_fastest_sync():
    sync = np.array([[0.5, 0.1], [0.2, 0.4], [0.1, 0.1]])
    np.testing.assert_allclose(idle_from_sync(sync), [[0.4, 0.0], [0.1, 0.3], [0.0, 0.0]])


def test_summary_of_two_ranks_two_steps():
    col = {c: i for i, c in enumerate(COLUMNS)}
    rows = np.zeros((2, 2, len(COLUMNS)))
    # rank 0 computes 3 s, rank 1 computes 1 s and waits 2 s more in the reduction; comm 0.5 s
    for s in range(2):
        rows[0, s, col["compute_wall"]] = 3.0
        rows[0, s, col["sync_wall"]] = 0.5
        rows[1, s, col["compute_wall"]] = 1.0
        rows[1, s, col["sync_wall"]] = 2.5
        rows[:, s, col["update_wall"]] = 0.25
        rows[:, s, col["compute_cpu"]] = [2.0, 0.75]
    out = summarize_steps(rows)
    np.testing.assert_allclose(out["busy_wall"], [6.5, 2.5])
    np.testing.assert_allclose(out["busy_cpu"], [4.0, 1.5])
    np.testing.assert_allclose(out["idle_wall"], [0.0, 4.0])
    np.testing.assert_allclose(out["comm_wall"], [1.0, 1.0])
    np.testing.assert_allclose(out["step_wall"], [2 * 3.75])


def test_step_timer_records_one_row_per_step():
    t = StepTimer()
    for _ in range(3):
        t.start_step()
        for ph in ("compute", "sync", "update"):
            t.mark(ph)
        t.end_step()
    rows = t.take()
    assert rows.shape == (3, len(COLUMNS)) and (rows >= 0).all()
    assert t.take().shape == (0, len(COLUMNS))
