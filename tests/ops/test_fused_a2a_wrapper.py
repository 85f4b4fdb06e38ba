"""paddle_semoe/comm/nccl_fused.py without a GPU: FusedNcclExchange driven by a stand-in for
the compiled fused ops that runs the C++ routes (semoe_a2a_plan) over a simulated world, so
the wrapper's plans, padding, autograd and communicator registry are checked against
ExpertExchange (the Python exchange) on every rank. The CUDA/NCCL side itself needs GPUs."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddle_semoe import ops
from paddle_semoe.comm import CommError, ExpertExchange, SimulatedWorld
from paddle_semoe.comm import nccl_fused
from paddle_semoe.comm.nccl_fused import FusedNcclExchange
from tests.comm.reference import make_payload
from tests.dist.comm_cases import case_counts

WIDTH = 5
PAD = 3
GROUP_ATTR = {0: "ep_group", 1: "intra_node_group", 2: "inter_node_group"}


@pytest.fixture(autouse=True)
def _fresh_registry():
    nccl_fused.destroy_communicators()  # communicators of earlier tests' stand-ins
    yield
    nccl_fused.destroy_communicators()


class SimulatedFusedOps:
    """The op contract of custom_ops/cuda/fused_a2a_op.cc, executed with the C++ plan of
    semoe_a2a_plan and the simulated communicator (gathers + exchange_rows)."""

    def __init__(self, world: SimulatedWorld, topology) -> None:
        self.comm = world.communicator(topology.rank)
        self.topology = topology
        self.lib = ops.resolve_backend("custom")
        self.calls: list[str] = []
        self.fail_with: str | None = None

    def gather_counts(self, counts, group, watchdog):
        self.calls.append("gather_counts")
        return self.comm.all_gather_counts(counts, group)

    def create_comm(self, group, device, watchdog) -> int:
        self.calls.append("create_comm")
        return 1000 + group.global_rank

    def destroy_comm(self, comm, abort) -> None:
        self.calls.append(f"destroy_comm {comm} abort={abort}")

    def dispatch(self, rows, counts, comm, ep_rank, ep_size, El, node_size, hier, timeout_ms):
        self.calls.append("dispatch")
        assert comm == 1000 + self.topology.rank and timeout_ms == 7000
        C = self.comm.all_gather_counts(counts, self.topology.ep_group)
        Ct = paddle.to_tensor(C.astype(np.int64), place=paddle.CPUPlace())
        local = self.route(rows, Ct, comm, ep_rank, ep_size, El, node_size, hier, False, -1)
        lc = C[:, ep_rank * El : (ep_rank + 1) * El].sum(axis=0).astype(np.int32)
        return local, paddle.to_tensor(lc), Ct

    def route(self, x, C, comm, me, P, El, node_size, hier, inverse, out_rows):
        self.calls.append(f"route inverse={inverse}")
        if self.fail_with:
            raise RuntimeError(self.fail_with)
        assert C.place.is_cpu_place() and C.dtype == paddle.int64
        plan = self.lib.semoe_a2a_plan(C, me, El, node_size, hier, inverse)
        _, sizes, steps, perms, splits, _ = (t.numpy() for t in plan)
        rows_in, rows_out = sizes.tolist()
        assert x.shape[0] >= rows_in
        y, p_off, s_off = x[:rows_in], 0, 0
        for kind, group, _, n_out in steps.tolist():
            if kind == 0:
                y = paddle.gather(y, paddle.to_tensor(perms[p_off : p_off + n_out]), axis=0)
                p_off += n_out
            else:
                g = getattr(self.topology, GROUP_ATTR[group])
                S = splits[s_off : s_off + g.size * g.size].reshape(g.size, g.size)
                s_off += g.size * g.size
                y = self.comm.exchange_rows(y, S, g)
        out_rows = rows_out if out_rows < 0 else out_rows
        if out_rows > y.shape[0]:
            y = paddle.concat([y, paddle.zeros([out_rows - y.shape[0], x.shape[1]], x.dtype)])
        return y.clone()


def _step(ex, rows_np, counts, w_np, split_phases: bool):
    x = paddle.to_tensor(rows_np, stop_gradient=False)
    if split_phases:
        plan = ex.exchange_counts(paddle.to_tensor(counts))
        local, plan = ex.dispatch_rows(x, plan)
        local_counts = plan.local_counts_tensor()
    else:
        local, local_counts, plan = ex.dispatch(x, paddle.to_tensor(counts))
    w = paddle.to_tensor(w_np[: local.shape[0]])
    back = ex.combine(local * w, plan)
    (back * back).sum().backward()
    return local.numpy(), local_counts.numpy(), back.numpy(), x.grad.numpy(), plan


@pytest.mark.parametrize(
    "P, El, rpn, hier", [(2, 2, 2, False), (4, 2, 2, True), (4, 1, 4, True), (6, 1, 3, True), (4, 3, 1, False)]
)
@pytest.mark.parametrize("mode", ["uneven", "rank0_sends_nothing", "nobody_sends", "only_to_rank0"])
@pytest.mark.parametrize("split_phases", [False, True])
def test_fused_wrapper_matches_expert_exchange(P, El, rpn, hier, mode, split_phases):
    counts = case_counts(P, El, seed=P * 10 + El, mode=mode)
    rows = [make_payload(s, counts[s], WIDTH, padding=PAD) for s in range(P)]
    rng = np.random.default_rng(P)
    w = rng.standard_normal((int(sum(c.sum() for c in counts)) + 1, WIDTH)).astype(np.float32)
    results = {}
    for fused in (False, True):
        world = SimulatedWorld(P, timeout_s=20)

        def rank_fn(r: int):
            topo = world.topology(r, ep_degree=P, ranks_per_node=rpn)
            if fused:
                fake = SimulatedFusedOps(world, topo)
                ex = FusedNcclExchange(topo, El, hierarchical=hier, timeout_s=7.0, ops=fake, device=0)
            else:
                ex = ExpertExchange(topo, El, communicator=world.communicator(r), hierarchical=hier)
            out = _step(ex, rows[r], counts[r], w, split_phases)
            if fused:
                assert fake.calls.count("create_comm") == 1  # built once, reused by every call
                if not split_phases:
                    assert fake.calls.count("dispatch") == 1
            return out

        results[fused] = world.run(rank_fn)
    for r in range(P):
        (lp, cp, bp, gp, plan_p), (lf, cf, bf, gf, plan_f) = results[False][r], results[True][r]
        np.testing.assert_array_equal(lf, lp, err_msg=f"local rows of rank {r}")
        np.testing.assert_array_equal(cf, cp)
        assert cf.dtype == np.int32
        np.testing.assert_array_equal(bf, bp, err_msg=f"combined rows of rank {r}")
        np.testing.assert_allclose(gf, gp, rtol=1e-6, atol=1e-6, err_msg=f"grad of rank {r}")
        n = int(counts[r].sum())
        assert not bf[n:].any() and not gf[n:].any()  # padding rows: zero out, zero grad
        np.testing.assert_array_equal(plan_f.count_matrix, plan_p.count_matrix)
        assert (plan_f.num_send_rows, plan_f.num_input_rows, plan_f.num_local_rows) == (
            plan_p.num_send_rows, plan_p.num_input_rows, plan_p.num_local_rows)


def test_aborted_communicator_is_dropped_and_reported():
    world = SimulatedWorld(1)
    topo = world.topology(0, ep_degree=1)
    fake = SimulatedFusedOps(world, topo)
    ex = FusedNcclExchange(topo, 2, timeout_s=7.0, ops=fake, device=0)
    counts = np.array([2, 1], np.int32)
    local, _, plan = ex.dispatch(paddle.to_tensor(make_payload(0, counts, WIDTH)), paddle.to_tensor(counts))
    fake.fail_with = "semoe_fused_a2a_route: the exchange did not finish ...; the communicator was aborted"
    with pytest.raises(CommError, match="fused all-to-all route on ep\\[ranks 0\\]"):
        ex.combine(local, plan)
    assert ex._comm is None
    fake.fail_with = None
    ex.combine(local, plan)  # a new communicator is built on the next call
    assert fake.calls.count("create_comm") == 2
    assert nccl_fused.destroy_communicators() >= 1
    assert any(c.startswith("destroy_comm 1000 abort=False") for c in fake.calls)


def test_argument_errors():
    world = SimulatedWorld(1)
    topo = world.topology(0, ep_degree=1)
    ex = FusedNcclExchange(topo, 2, ops=SimulatedFusedOps(world, topo), device=0)
    with pytest.raises(ValueError, match=r"counts must have shape \[E=2\]"):
        ex.dispatch(paddle.zeros([3, 4]), paddle.zeros([3], dtype="int32"))
    with pytest.raises(ValueError, match="integer"):
        ex.dispatch(paddle.zeros([3, 4]), paddle.zeros([2]))
    with pytest.raises(ValueError, match="must be a positive int"):
        FusedNcclExchange(topo, 0, ops=SimulatedFusedOps(world, topo), device=0)


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="checks the message of a CPU build")
def test_cpu_build_says_the_fused_op_needs_cuda():
    assert not nccl_fused.fused_ops_available()
    with pytest.raises(RuntimeError, match="CUDA build of Paddle"):
        nccl_fused.CompiledFusedOps()


def test_nccl_library_path(monkeypatch):
    monkeypatch.setenv("SEMOE_NCCL_LIB", "/opt/x/libnccl.so.2")
    assert nccl_fused.nccl_library_path() == "/opt/x/libnccl.so.2"
    monkeypatch.delenv("SEMOE_NCCL_LIB")
    found = nccl_fused.nccl_library_path()
    assert found == "" or found.endswith("libnccl.so.2")
