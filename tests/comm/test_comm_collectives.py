"""The collectives layer of :class:`Communicator` on simulated ranks: host all-reduce (sum, max;
int64 and float64), tensor all-reduce, broadcast, all-gather, barrier; one-member groups; a
hung peer named in the error; and the one clipping rule over squared-norm parts."""

from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

from paddle_semoe.comm import CommError, SimulatedWorld
from paddle_semoe.comm.fusion import clip_by_global_norm_, squared_norm
from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.comm.transport import make_communicator


def _world(n: int, r: int) -> CommGroup:
    return CommGroup("world", tuple(range(n)), r)


def test_host_collectives_on_three_ranks() -> None:
    sim = SimulatedWorld(3, timeout_s=20)

    def rank_fn(r: int):
        comm, g = sim.communicator(r), _world(3, r)
        out = {
            "sum_f": comm.all_reduce([r + 0.5, -r], g),
            "max_i": comm.all_reduce(np.array([r, 10 - r], dtype=np.int64), g, "max"),
            "bcast": comm.broadcast(np.array([r * 1.0, 7.0]), g, src=2),
            "gather": comm.all_gather(np.array([r, r * r], dtype=np.int64), g),
        }
        t = paddle.to_tensor(np.array([r, -r], dtype=np.float32))
        out["tensor_max"] = comm.all_reduce_(t, g, "max").numpy()
        comm.barrier(g, what="test")
        return out

    for out in sim.run(rank_fn):
        np.testing.assert_array_equal(out["sum_f"], [4.5, -3.0])
        assert out["sum_f"].dtype == np.float64
        np.testing.assert_array_equal(out["max_i"], [2, 10])
        assert out["max_i"].dtype == np.int64
        np.testing.assert_array_equal(out["bcast"], [2.0, 7.0])
        np.testing.assert_array_equal(out["gather"], [[0, 0], [1, 1], [2, 4]])
        np.testing.assert_array_equal(out["tensor_max"], [2.0, 0.0])


def test_one_member_groups_never_communicate_and_bad_arguments_are_refused() -> None:
    comm = make_communicator("gloo", rank=0)  # no process group exists: nothing may touch one
    solo = CommGroup.solo("world")
    np.testing.assert_array_equal(comm.all_reduce([1.5, 2.0], solo, "max"), [1.5, 2.0])
    np.testing.assert_array_equal(comm.all_gather(np.array([3, 4]), solo), [[3, 4]])
    np.testing.assert_array_equal(comm.broadcast([9.0], solo), [9.0])
    comm.barrier(solo)
    with pytest.raises(ValueError, match="reduction op must be one of"):
        comm.all_reduce([1.0], solo, "min")
    with pytest.raises(ValueError, match="src=1 is not a rank in the group"):
        comm.broadcast([1.0], solo, src=1)


def test_a_peer_that_never_joins_is_named_with_the_collective_and_group() -> None:
    """(A peer that hangs while alive is the multi-process test tests/dist/test_hang_dist.py.)"""
    sim = SimulatedWorld(2, timeout_s=20)
    errors: list[str] = []

    def rank_fn(r: int):
        if r == 1:
            return  # leaves without joining
        try:
            sim.communicator(r).all_reduce([1.0], _world(2, r), "max", what="non-finite step check")
        except CommError as exc:
            errors.append(str(exc))

    sim.run(rank_fn)
    assert errors, "rank 0 must fail"
    assert "all_reduce[max] (non-finite step check) on group world[ranks 0,1]: peer rank(s) [1]" in errors[0], errors


def test_clip_by_global_norm_sums_the_owned_part_over_the_group() -> None:
    sim = SimulatedWorld(2, timeout_s=20)

    def rank_fn(r: int):
        shared = paddle.to_tensor(np.array([3.0], np.float32))  # equal on both ranks: counts once
        owned = paddle.to_tensor(np.array([4.0 * (r + 1)], np.float32))  # 4 on rank 0, 8 on rank 1
        norm, coef = clip_by_global_norm_(
            [shared, owned], squared_norm([shared]), squared_norm([owned]), 1.0, sim.communicator(r), _world(2, r)
        )
        return norm, coef, shared.numpy(), owned.numpy()

    want = math.sqrt(9 + 16 + 64)
    for r, (norm, coef, shared, owned) in enumerate(sim.run(rank_fn)):
        assert norm == pytest.approx(want, rel=1e-6)
        assert coef == pytest.approx(1.0 / (want + 1e-6), rel=1e-6)
        np.testing.assert_allclose(shared, [3.0 * coef], rtol=1e-6)
        np.testing.assert_allclose(owned, [4.0 * (r + 1) * coef], rtol=1e-6)


def test_clip_by_global_norm_measures_only_under_an_infinite_bound() -> None:
    g = paddle.to_tensor(np.array([3.0, 4.0], np.float32))
    norm, coef = clip_by_global_norm_([g], 25.0, 0.0, math.inf)
    assert (norm, coef) == (5.0, 1.0)
    np.testing.assert_array_equal(g.numpy(), [3.0, 4.0])
    with pytest.raises(ValueError, match="max_norm must be positive"):
        clip_by_global_norm_([g], 25.0, 0.0, 0.0)
