"""ExpertExchange over a simulated world: layout, inverse, gradients, hierarchical == flat."""

from __future__ import annotations


import numpy as np
import paddle
import pytest

from paddle_semoe.comm import CommError, ExpertExchange, SimulatedWorld, Topology
from tests.comm.reference import (
    decode_payload,
    make_payload,
    reference_combine,
    reference_dispatch,
)
from tests.dist.comm_cases import COUNT_MODES, case_counts

WIDTH = 5
PAD = 3


def _run_dispatch(P: int, El: int, rpn: int, hier: bool, counts: list[np.ndarray]):
    world = SimulatedWorld(P, timeout_s=20)

    def rank_fn(r: int):
        topo = world.topology(r, ep_degree=P, ranks_per_node=rpn)
        ex = ExpertExchange(topo, El, communicator=world.communicator(r), hierarchical=hier)
        x = paddle.to_tensor(make_payload(r, counts[r], WIDTH, padding=PAD))
        local, local_counts, plan = ex.dispatch(x, paddle.to_tensor(counts[r]))
        back = ex.combine(local * 2.0, plan)
        return local.numpy(), local_counts.numpy(), back.numpy(), plan

    return world.run(rank_fn)


MODES = COUNT_MODES


@pytest.mark.parametrize("P, El, rpn", [(2, 2, 2), (4, 2, 2), (4, 1, 4), (6, 1, 3)])
@pytest.mark.parametrize("mode", MODES)
def test_dispatch_layout_and_combine_inverse(P: int, El: int, rpn: int, mode: str) -> None:
    counts = case_counts(P, El, seed=P * 10 + El, mode=mode)
    rows = [make_payload(s, counts[s], WIDTH, padding=PAD) for s in range(P)]
    exp_rows, exp_counts = reference_dispatch([r[: counts[s].sum()] for s, r in enumerate(rows)], counts, El)
    results = {hier: _run_dispatch(P, El, rpn, hier, counts) for hier in (False, True)}
    for hier, res in results.items():
        for d, (local, local_counts, back, plan) in enumerate(res):
            assert local_counts.dtype == np.int32
            np.testing.assert_array_equal(local_counts, exp_counts[d])
            np.testing.assert_array_equal(local, exp_rows[d], err_msg=f"hier={hier} dest={d}")
            # the decoded origins say the same: expert-major over local experts, sources ascending
            origin = decode_payload(local)
            assert (origin[:, 2] // El == d).all()
            keys = origin[:, 2] * P + origin[:, 0]
            assert (np.diff(keys) >= 0).all()
            # combine is the inverse route; padding rows come back as zeros
            n = int(counts[d].sum())
            np.testing.assert_array_equal(back[:n], 2.0 * rows[d][:n])
            np.testing.assert_array_equal(back[n:], 0.0)
            assert plan.hierarchical == hier
    for d in range(P):  # hierarchical layout identical to flat
        np.testing.assert_array_equal(results[True][d][0], results[False][d][0])


def test_gradients_match_numpy_model() -> None:
    P, El, rpn = 4, 2, 2
    counts = case_counts(P, El, seed=7, mode="uneven")
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((int(c.sum()) + PAD, WIDTH)).astype(np.float32) for c in counts]
    ws = [rng.standard_normal(x.shape).astype(np.float32) for x in xs]
    exp_local, exp_lc = reference_dispatch([x[: c.sum()] for x, c in zip(xs, counts)], counts, El)
    vs = [rng.standard_normal(l.shape).astype(np.float32) for l in exp_local]

    # numpy model: out_s = combine(v_d * dispatch(x)); L = sum_s sum(w_s * out_s)
    # dL/dv_d = dispatch(w) * dispatch(x) ; dL/dx_s = combine(v_d * dispatch(w))
    w_local, _ = reference_dispatch([w[: c.sum()] for w, c in zip(ws, counts)], counts, El)
    exp_gv = [wl * xl for wl, xl in zip(w_local, exp_local)]
    exp_gx = reference_combine([v * wl for v, wl in zip(vs, w_local)], counts, El, [x.shape[0] for x in xs])

    for hier in (False, True):
        world = SimulatedWorld(P, timeout_s=20)

        def rank_fn(r: int):
            topo = world.topology(r, ep_degree=P, ranks_per_node=rpn)
            ex = ExpertExchange(topo, El, communicator=world.communicator(r), hierarchical=hier)
            x = paddle.to_tensor(xs[r], stop_gradient=False)
            v = paddle.to_tensor(vs[r], stop_gradient=False)
            local, _, plan = ex.dispatch(x, paddle.to_tensor(counts[r]))
            out = ex.combine(local * v, plan)
            loss = (out * paddle.to_tensor(ws[r])).sum()
            loss.backward()
            return x.grad.numpy(), v.grad.numpy()

        res = world.run(rank_fn)
        for r in range(P):
            np.testing.assert_allclose(res[r][0], exp_gx[r], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(res[r][1], exp_gv[r], rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(res[r][0][int(counts[r].sum()) :], 0.0)  # padding


def test_single_process_is_identity() -> None:
    topo = Topology.single()
    ex = ExpertExchange(topo, 3, backend="gloo")
    counts = np.array([2, 0, 3], np.int32)
    x = paddle.to_tensor(make_payload(0, counts, WIDTH, padding=2), stop_gradient=False)
    local, lc, plan = ex.dispatch(x, paddle.to_tensor(counts))
    np.testing.assert_array_equal(local.numpy(), x.numpy()[:5])
    np.testing.assert_array_equal(lc.numpy(), counts)
    out = ex.combine(local, plan)
    out.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.r_[np.ones((5, WIDTH)), np.zeros((2, WIDTH))])


def test_argument_errors() -> None:
    ex = ExpertExchange(Topology.single(), 2, backend="gloo")
    with pytest.raises(ValueError, match=r"counts must have shape \[E=2\]"):
        ex.dispatch(paddle.zeros([3, 4]), paddle.to_tensor(np.array([1, 1, 1], np.int32)))
    with pytest.raises(ValueError, match="integer"):
        ex.dispatch(paddle.zeros([3, 4]), paddle.to_tensor(np.array([1.0, 1.0], np.float32)))
    with pytest.raises(ValueError, match="rows has 3 rows but counts sum to 4"):
        ex.dispatch(paddle.zeros([3, 4]), paddle.to_tensor(np.array([2, 2], np.int32)))
    _, _, plan = ex.dispatch(paddle.zeros([3, 4]), paddle.to_tensor(np.array([1, 1], np.int32)))
    with pytest.raises(ValueError, match=r"local_out must be \[R_loc=2, D\]"):
        ex.combine(paddle.zeros([3, 4]), plan)
    with pytest.raises(ValueError, match="num_local_experts"):
        ExpertExchange(Topology.single(), 0, backend="gloo")
    with pytest.raises(ValueError, match="backend must be one of"):
        ExpertExchange(Topology.single(), 1, backend="mpi")


def test_simulated_world_reports_a_failed_peer() -> None:
    world = SimulatedWorld(2, timeout_s=20)

    def rank_fn(r: int):
        if r == 1:
            raise RuntimeError("boom on rank 1")
        topo = world.topology(r, ep_degree=2, ranks_per_node=2)
        ex = ExpertExchange(topo, 1, communicator=world.communicator(r))
        ex.dispatch(paddle.zeros([1, 3]), paddle.to_tensor(np.array([1, 0], np.int32)))

    with pytest.raises(RuntimeError, match="boom on rank 1"):
        world.run(rank_fn)


def test_simulated_world_reports_a_missing_peer() -> None:
    world = SimulatedWorld(2, timeout_s=20)
    errors = []

    def rank_fn(r: int):
        if r == 1:
            return None  # never joins the exchange
        topo = world.topology(r, ep_degree=2, ranks_per_node=2)
        ex = ExpertExchange(topo, 1, communicator=world.communicator(r))
        try:
            ex.dispatch(paddle.zeros([1, 3]), paddle.to_tensor(np.array([1, 0], np.int32)))
        except CommError as exc:
            errors.append(str(exc))

    world.run(rank_fn)
    assert errors and "all_gather_counts on group ep[ranks 0,1]" in errors[0] and "[1]" in errors[0]


def test_simulated_world_reports_mismatched_collectives() -> None:
    world = SimulatedWorld(2, timeout_s=20)

    def rank_fn(r: int):
        topo = world.topology(r, ep_degree=2, ranks_per_node=2)
        comm = world.communicator(r)
        if r == 0:
            comm.all_reduce_(paddle.ones([2]), topo.ep_group)
        else:
            comm.all_gather_counts(np.array([1, 2]), topo.ep_group)

    with pytest.raises(CommError, match="collective mismatch"):
        world.run(rank_fn)
