"""The C++ exchange layout (custom_ops/include/semoe/a2a_layout.h, through the CPU op
``semoe_a2a_plan``) equals paddle_semoe/comm/layout.py step for step, and executing it over
all ranks gives the reference dispatch layout and its inverse."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddle_semoe import ops
from paddle_semoe.comm.layout import Exchange, Permute, flat_route, hierarchical_route, invert_route
from tests.comm.reference import make_payload, reference_dispatch
from paddle_semoe.comm.topology import group_rank_lists

GROUPS = {0: "ep_group", 1: "intra_node_group", 2: "inter_node_group"}
KIND_OF_GROUP = {"ep_group": "ep", "intra_node_group": "intra_node", "inter_node_group": "inter_node"}
MODES = ("uneven", "zeros", "rank_sends_nothing", "rank_receives_nothing", "one_hot_expert", "large")


@pytest.fixture(scope="module")
def lib():
    return ops.resolve_backend("custom")


def count_matrix(rng: np.random.Generator, P: int, El: int, mode: str) -> np.ndarray:
    E = P * El
    C = rng.integers(0, 6, size=(P, E)).astype(np.int64)
    C[rng.random((P, E)) < 0.3] = 0
    if mode == "zeros":
        C[:] = 0
    elif mode == "rank_sends_nothing":
        C[rng.integers(P)] = 0
    elif mode == "rank_receives_nothing":
        d = rng.integers(P)
        C[:, d * El : (d + 1) * El] = 0
    elif mode == "one_hot_expert":
        C[:] = 0
        C[:, rng.integers(E)] = rng.integers(1, 9, size=P)
    elif mode == "large":
        C = rng.integers(0, 100_000, size=(P, E)).astype(np.int64)
    return C


def cpp_route(lib, C: np.ndarray, me: int, El: int, L: int, hier: bool, inverse: bool = False):
    """(local_counts, (rows_in, rows_out), steps) with steps as ("permute", index) or
    ("exchange", group name, splits [G, G], members [G])."""
    out = lib.semoe_a2a_plan(paddle.to_tensor(C), me, El, L, hier, inverse)
    local_counts, sizes, steps, perms, splits, members = (t.numpy() for t in out)
    for t in out:
        assert t.dtype == paddle.int64
    parsed, p_off, s_off, m_off = [], 0, 0, 0
    for kind, group, rows_in, rows_out in steps.tolist():
        if kind == 0:
            assert group == -1 and rows_in == rows_out
            parsed.append(("permute", perms[p_off : p_off + rows_out]))
            p_off += rows_out
        else:
            G = {0: C.shape[0], 1: L, 2: C.shape[0] // L}[group]
            S = splits[s_off : s_off + G * G].reshape(G, G)
            mem = members[m_off : m_off + G]
            s_off, m_off = s_off + G * G, m_off + G
            me_in = mem.tolist().index(me)
            assert rows_in == S[me_in].sum() and rows_out == S[:, me_in].sum()
            parsed.append(("exchange", GROUPS[group], S, mem))
    assert p_off == perms.size and s_off == splits.size and m_off == members.size
    return local_counts, tuple(sizes.tolist()), parsed


def python_route(C: np.ndarray, me: int, El: int, L: int, hier: bool, inverse: bool = False):
    route = hierarchical_route(C, me, El, L) if hier else flat_route(C, me, El)
    if inverse:
        route = invert_route(route)
    P = C.shape[0]
    lists = group_rank_lists(P, P, L)
    out = []
    for step in route:
        if isinstance(step, Permute):
            out.append(("permute", step.index))
        else:
            assert isinstance(step, Exchange)
            (members,) = [g for g in lists[KIND_OF_GROUP[step.group]] if me in g]
            out.append(("exchange", step.group, step.splits, np.array(members)))
    return out


def assert_same_route(got, want, what: str) -> None:
    assert [s[:2] if s[0] == "exchange" else s[0] for s in got] == [
        s[:2] if s[0] == "exchange" else s[0] for s in want
    ], what
    for g, w in zip(got, want):
        if g[0] == "permute":
            np.testing.assert_array_equal(g[1], w[1], err_msg=what)
        else:
            np.testing.assert_array_equal(g[2], w[2], err_msg=f"{what}: splits of {g[1]}")
            np.testing.assert_array_equal(g[3], w[3], err_msg=f"{what}: members of {g[1]}")


def _divisors(P: int) -> list[int]:
    return [L for L in range(1, P + 1) if P % L == 0]


@pytest.mark.parametrize("P", [1, 2, 4, 8])
@pytest.mark.parametrize("El", [1, 2, 3])
def test_plan_matches_layout_py(lib, P: int, El: int) -> None:
    rng = np.random.default_rng(100 * P + El)
    n_permutes = 0
    for mode in MODES:
        C = count_matrix(rng, P, El, mode)
        for me in range(P):
            want_counts = C[:, me * El : (me + 1) * El].sum(axis=0)
            for L in _divisors(P):
                for hier in (False, True):
                    if not hier and L != P:
                        continue  # the flat route ignores the node size
                    for inverse in (False, True):
                        what = f"P={P} El={El} mode={mode} me={me} L={L} hier={hier} inverse={inverse}"
                        counts, sizes, got = cpp_route(lib, C, me, El, L, hier, inverse)
                        np.testing.assert_array_equal(counts, want_counts, err_msg=what)
                        n_send, n_local = int(C[me].sum()), int(want_counts.sum())
                        assert sizes == ((n_local, n_send) if inverse else (n_send, n_local)), what
                        want = python_route(C, me, El, L, hier, inverse)
                        assert_same_route(got, want, what)
                        n_permutes += sum(s[0] == "permute" for s in got)
    if El > 1 and P > 1 or P >= 4:
        assert n_permutes > 0  # the comparison saw real permutations, not only identities


def _execute(routes: list[list], bufs: list[np.ndarray], P: int) -> list[np.ndarray]:
    """Run every rank's parsed route over numpy buffers (exchanges in lockstep)."""
    bufs = list(bufs)
    pcs = [0] * P
    while True:
        for r in range(P):
            while pcs[r] < len(routes[r]) and routes[r][pcs[r]][0] == "permute":
                bufs[r] = bufs[r][routes[r][pcs[r]][1]]
                pcs[r] += 1
        if all(pcs[r] == len(routes[r]) for r in range(P)):
            return bufs
        steps = [routes[r][pcs[r]] for r in range(P)]
        new = list(bufs)
        for r in range(P):
            _, group, S, members = steps[r]
            me = members.tolist().index(r)
            parts = []
            for g, s in enumerate(members.tolist()):
                assert steps[s][1] == group
                np.testing.assert_array_equal(steps[s][2], S)  # every member has the same matrix
                off = int(S[g, :me].sum())
                parts.append(bufs[s][off : off + S[g, me]])
            new[r] = np.concatenate(parts)
        bufs = new
        pcs = [p + 1 for p in pcs]


@pytest.mark.parametrize("P, El, L", [(2, 2, 1), (4, 2, 2), (4, 3, 4), (8, 1, 2), (8, 2, 4), (6, 2, 3)])
@pytest.mark.parametrize("mode", ["uneven", "rank_sends_nothing", "rank_receives_nothing", "one_hot_expert"])
def test_executing_the_cpp_routes_gives_the_reference_layout(lib, P: int, El: int, L: int, mode: str) -> None:
    rng = np.random.default_rng(P * 31 + El * 7 + L)
    C = count_matrix(rng, P, El, mode)
    counts = [C[s].astype(np.int32) for s in range(P)]
    rows = [make_payload(s, counts[s], 4) for s in range(P)]
    expected, expected_counts = reference_dispatch(rows, counts, El)
    for hier in (False, True):
        fwd = [cpp_route(lib, C, me, El, L, hier)[2] for me in range(P)]
        got = _execute(fwd, rows, P)
        for d in range(P):
            np.testing.assert_array_equal(got[d], expected[d], err_msg=f"hier={hier} dest={d}")
        bwd = [cpp_route(lib, C, me, El, L, hier, inverse=True)[2] for me in range(P)]
        back = _execute(bwd, [2.0 * g for g in got], P)
        for s in range(P):
            np.testing.assert_array_equal(back[s], 2.0 * rows[s], err_msg=f"hier={hier} source={s}")


def test_one_rank_route_is_a_single_self_exchange(lib) -> None:
    C = np.array([[3, 0, 2]], dtype=np.int64)
    counts, sizes, route = cpp_route(lib, C, 0, 3, 1, False)
    assert counts.tolist() == [3, 0, 2] and sizes == (5, 5)
    assert len(route) == 1 and route[0][0] == "exchange"  # receive order is already e-major
    assert route[0][2].tolist() == [[5]] and route[0][3].tolist() == [0]


def test_known_two_rank_layout(lib) -> None:
    # rank 0 sends 1 row to expert 0, 2 to expert 1, 3 to expert 2, 0 to expert 3;
    # rank 1 sends 4, 0, 5, 6. El = 2: rank 1 owns experts 2, 3.
    C = np.array([[1, 2, 3, 0], [4, 0, 5, 6]], dtype=np.int64)
    counts, sizes, route = cpp_route(lib, C, 1, 2, 2, False)
    assert counts.tolist() == [8, 6] and sizes == (15, 14)
    assert route[0][2].tolist() == [[3, 3], [4, 11]]
    # received: [r0 e2 (3 rows)] [r1 e2 (5)] [r1 e3 (6)] -> e2: r0, r1, then e3: r1 (already
    # in order: identity permutation left out); rank 0 receives [r0 e0 1][r0 e1 2][r1 e0 4]:
    assert len(route) == 1
    _, _, route0 = cpp_route(lib, C, 0, 2, 2, False)
    assert route0[1][0] == "permute"
    assert route0[1][1].tolist() == [0, 3, 4, 5, 6, 1, 2]  # e0: r0 (row 0), r1 (3..6); e1: r0


@pytest.mark.parametrize(
    "C, kwargs, message",
    [
        (np.array([[0, 0, 0, 0], [0, 0, -1, 0]], np.int64), {}, r"negative count -1 \(source 1, expert 2\)"),
        (np.zeros((2, 3), np.int64), {}, r"must have shape \[P=2, E=4\]"),
        (np.zeros((4, 4), np.int64), {"El": 1, "L": 3, "hier": True},
         "node_size=3 must divide the EP group size 4"),
        (np.zeros((2, 4), np.int64), {"me": 2}, r"ep_rank=2 outside the EP group \[0, 2\)"),
        (np.zeros((2, 4), np.int32), {}, "argument 'count_matrix' must be int64"),
        (np.zeros((2, 4), np.int64), {"El": 0}, "num_local_experts must be >= 1"),
    ],
)
def test_invalid_arguments_name_the_problem(lib, C, kwargs, message) -> None:
    args = {"me": 0, "El": 2, "L": 1, "hier": False, **kwargs}
    with pytest.raises(Exception, match=message):
        lib.semoe_a2a_plan(paddle.to_tensor(C), args["me"], args["El"], args["L"], args["hier"], False)
