"""tools/bench_comm.py, device-limited section: the byte / fan-out accounting against an
independent per-token computation, the real router's fan-out bound (at most M EP ranks per
token) and the rows the real ExpertExchange moves. No timing."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_semoe.comm import ExpertExchange, SimulatedWorld

ROOT = Path(__file__).resolve().parents[2]


def _bench_comm():
    spec = importlib.util.spec_from_file_location("tool_bench_comm", ROOT / "tools" / "bench_comm.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


bc = _bench_comm()


def _loop_accounting(ids: np.ndarray, kept: np.ndarray, E: int, P: int) -> dict:
    """Independent model: walk the tokens one by one with Python sets."""
    El = E // P
    T = ids.shape[0]
    counts = np.zeros(E, np.int64)
    rows = np.zeros(P, np.int64)
    tokens = np.zeros(P, np.int64)
    fan = np.zeros(T, np.int64)
    sel = np.zeros(T, np.int64)
    for t in range(T):
        kept_ranks, chosen_ranks = set(), set()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            chosen_ranks.add(e // El)
            if kept[t, j]:
                counts[e] += 1
                rows[e // El] += 1
                kept_ranks.add(e // El)
        for r in kept_ranks:
            tokens[r] += 1
        fan[t], sel[t] = len(kept_ranks), len(chosen_ranks)
    return dict(counts_E=counts, rows_per_rank_P=rows, tokens_per_rank_P=tokens, fanout_T=fan, selected_fanout_T=sel)


def _check_against_loops(ids, kept, E, P):
    got = bc.exchange_accounting(ids, kept, E, P)
    want = _loop_accounting(ids, kept, E, P)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    return got


def test_accounting_hand_built_case():
    # E=8 on P=4 ranks (2 experts each), k=3; token 1 drops its choice of expert 7 (rank 3)
    ids = np.array([[0, 1, 2], [3, 7, 4], [5, 4, 0]])
    kept = np.array([[True, True, True], [True, False, True], [True, True, True]])
    got = _check_against_loops(ids, kept, 8, 4)
    np.testing.assert_array_equal(got["counts_E"], [2, 1, 1, 1, 2, 1, 0, 0])
    np.testing.assert_array_equal(got["rows_per_rank_P"], [3, 2, 3, 0])  # one row per kept (token, expert)
    np.testing.assert_array_equal(got["tokens_per_rank_P"], [2, 2, 2, 0])  # one row per (token, rank)
    np.testing.assert_array_equal(got["fanout_T"], [2, 2, 2])
    np.testing.assert_array_equal(got["selected_fanout_T"], [2, 3, 2])


@pytest.mark.parametrize("T,E,K,P,seed", [(50, 16, 4, 4, 0), (33, 12, 3, 3, 1), (40, 8, 8, 2, 2)])
def test_accounting_random_cases(T, E, K, P, seed):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
    kept = rng.random((T, K)) < 0.8
    _check_against_loops(ids, kept, E, P)


def test_accounting_rejects_bad_input():
    with pytest.raises(ValueError, match="divide num_experts"):
        bc.exchange_accounting(np.zeros((2, 2), np.int64), np.ones((2, 2), bool), 6, 4)
    with pytest.raises(ValueError, match="expert ids must be in"):
        bc.exchange_accounting(np.full((2, 2), 9), np.ones((2, 2), bool), 8, 4)
    with pytest.raises(ValueError, match="same shape"):
        bc.exchange_accounting(np.zeros((2, 2), np.int64), np.ones((2, 3), bool), 8, 4)


def test_cases_skip_invalid_limits():
    cases, notes = bc.dl_cases([1, 2, 3, 5], ep=4, num_experts=16, top_k=8)
    assert [(c.router, c.limit) for c in cases] == [("token_choice", 0), ("device_limited", 2), ("device_limited", 3)]
    assert len(notes) == 2 and "M=1" in notes[0] and "M=5" in notes[1]


# ---------------------------------------------------------------- the real router and exchange
E, K, P, D, T = 16, 4, 4, 8, 48


@pytest.mark.parametrize("limit", [0, 1, 2, 3])
@pytest.mark.parametrize("cf", [0.0, 1.0])
def test_routed_fanout_and_exchange_rows(limit, cf):
    case = bc.DLCase("token_choice" if limit == 0 else "device_limited", limit)
    routed = [
        bc.route_device_limited(case, tokens=T, d_model=D, num_experts=E, top_k=K, ep_degree=P,
                                capacity_factor=cf, seed=3, ep_rank=r)
        for r in range(P)
    ]
    accs = []
    for ids, kept, counts in routed:
        acc = _check_against_loops(ids, kept, E, P)
        np.testing.assert_array_equal(acc["counts_E"], counts)  # kept choices per expert = Dispatch.counts
        if limit:
            assert acc["selected_fanout_T"].max() <= limit  # never more than M EP ranks per token
        if cf <= 0:
            assert kept.all()  # dropless: every rank sends exactly T * K rows
            assert acc["rows_per_rank_P"].sum() == T * K
        accs.append(acc)
    if limit == 1 and cf <= 0:
        assert all((a["tokens_per_rank_P"].sum() == T) for a in accs)  # dedup: each token once

    # the real exchange (simulated world) receives exactly one row per kept (token, expert)
    C = np.stack([a["counts_E"] for a in accs])
    world = SimulatedWorld(P, timeout_s=30)

    def rank_fn(r: int):
        topo = world.topology(r, ep_degree=P, ranks_per_node=P)
        ex = ExpertExchange(topo, E // P, communicator=world.communicator(r))
        rows = paddle.zeros([int(C[r].sum()), D], dtype="float32")
        local, _, plan = ex.dispatch(rows, paddle.to_tensor(C[r].astype(np.int32)))
        return plan.num_send_rows, local.shape[0]

    for r, (sent, received) in enumerate(world.run(rank_fn)):
        assert sent == accs[r]["rows_per_rank_P"].sum()
        assert received == sum(a["rows_per_rank_P"][r] for a in accs)


def test_plan_bytes_match_independent_numpy():
    args = argparse.Namespace(device_limited_ranks=[1, 2], dl_tokens=T, dl_d_model=D, dl_experts=E, dl_top_k=K,
                              dl_capacity_factor=0.0, dl_seed=5)
    plan, notes = bc.device_limited_plan(args, P)
    assert notes == [] and [c["limit"] for c in plan] == [0, 1, 2]
    row_bytes = D * 4
    for c in plan:
        case = bc.DLCase(c["router"], c["limit"])
        sent = dedup = dedup_off = 0
        recv, dedup_recv = np.zeros(P), np.zeros(P)
        fan = []
        for r in range(P):
            ids, kept, _ = bc.route_device_limited(case, tokens=T, d_model=D, num_experts=E, top_k=K, ep_degree=P,
                                                   capacity_factor=0.0, seed=5, ep_rank=r)
            ranks = ids // (E // P)
            per_token = [np.unique(ranks[t]) for t in range(T)]
            sent += ids.size
            dedup += sum(len(u) for u in per_token)
            dedup_off += sum(int((u != r).sum()) for u in per_token)
            np.add.at(recv, ranks.reshape(-1), 1)
            for u in per_token:
                dedup_recv[u] += 1
            fan += [len(u) for u in per_token]
        assert c["sent_bytes"] == pytest.approx(T * K * row_bytes)  # dropless: per-expert rows, fan-out aside
        assert c["sent_bytes"] == pytest.approx(sent / P * row_bytes)
        assert c["dedup_bytes"] == pytest.approx(dedup / P * row_bytes)
        assert c["dedup_offrank_bytes"] == pytest.approx(dedup_off / P * row_bytes)
        assert c["max_recv_bytes"] == pytest.approx(recv.max() * row_bytes)
        assert c["dedup_max_recv_bytes"] == pytest.approx(dedup_recv.max() * row_bytes)
        assert c["fanout_mean"] == pytest.approx(np.mean(fan))
        assert c["fanout_max"] == max(fan)
        if c["limit"]:
            assert c["fanout_max"] <= c["limit"]
            assert c["dedup_bytes"] <= T * c["limit"] * row_bytes
        assert np.asarray(c["dedup_splits"]).shape == (P, P)
        assert np.asarray(c["count_matrix"]).sum(axis=1).tolist() == [T * K] * P
