"""Split sizes, permutations and schedules of the exchange routes (numpy only)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from paddle_semoe.comm.layout import (
    Exchange,
    Permute,
    block_permutation,
    flat_route,
    hierarchical_route,
    invert_route,
    pairwise_schedule,
    rank_split_matrix,
    validate_count_matrix,
)
from tests.comm.reference import make_payload, random_counts, reference_dispatch
from paddle_semoe.comm.topology import group_rank_lists


def test_block_permutation() -> None:
    # blocks: [0,1] [2] [] [3,4,5]
    idx = block_permutation(np.array([2, 1, 0, 3]), np.array([3, 2, 0, 1]))
    assert idx.tolist() == [3, 4, 5, 0, 1, 2]
    assert block_permutation(np.array([0, 0]), np.array([1, 0])).size == 0


@pytest.mark.parametrize("size", range(1, 10))
def test_pairwise_schedule_is_a_round_robin(size: int) -> None:
    rounds = pairwise_schedule(size)
    seen = set()
    for partners in rounds:
        for i, p in enumerate(partners):
            if p < 0:
                continue
            assert partners[p] == i  # a matching
            assert p != i
            seen.add((min(i, p), max(i, p)))
    assert seen == set(itertools.combinations(range(size), 2))
    assert len(rounds) == (size - 1 if size % 2 == 0 else size) or size == 1


@pytest.mark.parametrize("P, El, L", [(4, 2, 2), (4, 1, 2), (6, 2, 3), (6, 2, 2), (8, 1, 2), (4, 3, 4), (2, 2, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flat_and_hierarchical_match_reference(P: int, El: int, L: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = [random_counts(rng, P * El, 5) for _ in range(P)]
    if seed == 2:
        counts[0][:] = 0  # a rank that sends nothing
    C = np.stack(counts).astype(np.int64)
    rows = [make_payload(s, counts[s], 4) for s in range(P)]
    expected, _ = reference_dispatch(rows, counts, El)
    for hier in (False, True):
        routes = [hierarchical_route(C, me, El, L) if hier else flat_route(C, me, El) for me in range(P)]
        got = [_execute(routes, rows, P, L, El)[d] for d in range(P)]
        for d in range(P):
            np.testing.assert_array_equal(got[d], expected[d], err_msg=f"hier={hier} dest={d}")
        back = [_execute([invert_route(r) for r in routes], got, P, L, El, reverse=True)[s] for s in range(P)]
        for s in range(P):
            np.testing.assert_array_equal(back[s], rows[s])


def _execute(routes: list[tuple], bufs: list[np.ndarray], P: int, L: int, El: int, reverse: bool = False) -> list[np.ndarray]:
    """Run each rank's route, aligning exchanges across ranks (permutes are local)."""
    lists = group_rank_lists(P, P, L)
    kind_of = {"ep_group": "ep", "intra_node_group": "intra_node", "inter_node_group": "inter_node"}
    bufs = list(bufs)
    pcs = [0] * P
    while True:
        # advance every rank through local permutes up to its next exchange
        for r in range(P):
            while pcs[r] < len(routes[r]) and isinstance(routes[r][pcs[r]], Permute):
                bufs[r] = bufs[r][routes[r][pcs[r]].index]
                pcs[r] += 1
        if all(pcs[r] == len(routes[r]) for r in range(P)):
            return bufs
        steps = [routes[r][pcs[r]] for r in range(P)]
        assert all(isinstance(s, Exchange) and s.group == steps[0].group for s in steps)
        new = list(bufs)
        for group in lists[kind_of[steps[0].group]]:
            S = steps[group[0]].splits
            for r in group:
                np.testing.assert_array_equal(steps[r].splits, S)
            for me, r in enumerate(group):
                parts = []
                for s_i, s in enumerate(group):
                    off = int(S[s_i, :me].sum())
                    parts.append(bufs[s][off : off + S[s_i, me]])
                new[r] = np.concatenate(parts)
        bufs = new
        pcs = [p + 1 for p in pcs]


def test_flat_route_of_one_rank_is_trivial() -> None:
    C = np.array([[3, 0, 2]])
    route = flat_route(C, 0, 3)
    assert len(route) == 1 and isinstance(route[0], Exchange)  # receive order is already e-major
    assert rank_split_matrix(C, 3).tolist() == [[5]]


def test_inverse_route_inverts_permutes() -> None:
    p = Permute(np.array([2, 0, 1]))
    x = np.arange(3) * 10
    assert (x[p.index][p.inverse.index] == x).all()


def test_count_matrix_validation() -> None:
    with pytest.raises(ValueError, match="shape"):
        validate_count_matrix(np.zeros((2, 3), np.int64), 2, 2)
    with pytest.raises(ValueError, match="negative count -1 \\(source 1, expert 2\\)"):
        validate_count_matrix(np.array([[0, 0, 0, 0], [0, 0, -1, 0]]), 2, 2)
    with pytest.raises(ValueError, match="integer"):
        validate_count_matrix(np.zeros((2, 4)), 2, 2)
    with pytest.raises(ValueError, match="node_size=3 must divide"):
        hierarchical_route(np.zeros((4, 4), np.int64), 0, 1, 3)
