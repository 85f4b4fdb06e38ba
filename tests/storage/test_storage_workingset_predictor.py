"""Working-set arena (bounded, overflow fallback) and the co-activation predictor."""

import logging

import numpy as np
import pytest

from paddle_semoe.storage.predictor import CoActivationPredictor
from paddle_semoe.storage.workingset import WorkingSetArena


def test_arena_allocates_aligned_views_and_resets():
    arena = WorkingSetArena(1 << 16)
    a, b = arena.alloc([(3, 5), (7,)])
    assert a.shape == (3, 5) and b.shape == (7,) and a.dtype == np.float32
    assert a.ctypes.data % 64 == 0 and b.ctypes.data % 64 == 0
    mark = arena.mark()
    (c,) = arena.alloc([(10,)])
    assert arena.used == 64 + 64 + 64
    arena.reset(mark)
    (d,) = arena.alloc([(10,)])
    assert d.ctypes.data == c.ctypes.data  # the region was reused
    arena.reset()
    assert arena.used == 0


def test_arena_overflow_falls_back_loudly_once(caplog):
    arena = WorkingSetArena(256)
    with caplog.at_level(logging.WARNING):
        arena.alloc([(1000,)], what="layer 3")
        arena.alloc([(1000,)], what="layer 4")
    warnings = [r for r in caplog.records if "FALLING BACK" in r.getMessage()]
    assert len(warnings) == 1 and "layer 3" in warnings[0].getMessage()
    assert arena.overflow_bytes == 8000 and arena.used == 0
    arena.reset()
    assert arena.overflow_bytes == 0


def test_predictor_learns_which_experts_follow():
    pr = CoActivationPredictor(num_layers=2, num_local=4, decay=1.0)
    assert pr.later_layer(0, np.array([1, 0, 0, 0], bool), 1).tolist() == [0, 0, 0, 0]  # no history
    for _ in range(3):  # task A: experts 0 -> 2; task B: 1 -> 3
        pr.observe(np.array([[1, 0, 0, 0], [0, 0, 1, 0]], bool))
        pr.observe(np.array([[0, 1, 0, 0], [0, 0, 0, 1]], bool))
    assert pr.later_layer(0, np.array([1, 0, 0, 0], bool), 1).tolist() == [0, 0, 1, 0]
    assert pr.later_layer(0, np.array([0, 1, 0, 0], bool), 1).tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match=r"target layer 2 must be in \(1, 2\)"):  # after the last
        pr.later_layer(1, np.array([0, 0, 1, 0], bool), 2)
    # across steps: A and B alternate, so after B (the last step) comes A
    assert pr.first_layer().tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match=r"active must be \[2, 4\]"):
        pr.observe(np.zeros((3, 4), bool))
