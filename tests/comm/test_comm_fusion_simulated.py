"""Gradient fusion rules, fused == unfused, MoE-aware clipping (simulated world)."""

from __future__ import annotations


import numpy as np
import paddle
import pytest

from paddle_semoe.comm import (
    ExpertExchange,
    GradientReducer,
    SimulatedWorld,
    Topology,
    build_buckets,
    clip_grad_norm_,
    reduce_gradients_unfused,
    reduction_rule,
)
from paddle_semoe.params import mark_params

from tests.dist.comm_cases import build_params, make_problem, rank_loss, reference_grads


def _param(shape: list[int], dtype: str = "float32") -> paddle.Tensor:
    return paddle.create_parameter(shape, dtype)


def test_buckets_never_mix_classes_or_dtypes_and_respect_the_cap() -> None:
    ps = [_param([4, 4]), _param([4]), _param([4, 4], "float64"), _param([8]), _param([100]), _param([2])]
    mark_params([ps[1]], "gate")
    mark_params([ps[3], ps[4]], "expert")
    frozen = _param([3])
    frozen.stop_gradient = True
    buckets = build_buckets(ps + [frozen], bucket_bytes=64 * 4)
    for b in buckets:
        assert len({(str(p.dtype), getattr(p, "semoe_param_class", "dense")) for p in b.params}) == 1
        assert b.nbytes <= 64 * 4 or len(b.params) == 1
    assert [b.param_class for b in buckets] == ["dense", "dense", "gate", "expert", "expert"]
    assert sum(len(b.params) for b in buckets) == 6  # frozen one skipped
    with pytest.raises(ValueError, match="bucket_bytes"):
        build_buckets(ps, 0)


def test_reduction_rules() -> None:
    t = Topology.from_handles(4, rank=1, ep_degree=2, ranks_per_node=2, handles={})
    assert reduction_rule("dense", t).group.ranks == (0, 1, 2, 3)
    assert reduction_rule("gate", t).group.ranks == (0, 1, 2, 3)
    assert reduction_rule("expert", t).group.ranks == (1, 3)
    assert all(reduction_rule(c, t).scale == 0.25 for c in ("dense", "gate", "expert"))
    t4 = Topology.from_handles(4, rank=1, ep_degree=4, ranks_per_node=2, handles={})
    assert reduction_rule("expert", t4).group is None and reduction_rule("expert", t4).scale == 0.25
    assert reduction_rule("gate", t4).group.ranks == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="unknown parameter class"):
        reduction_rule("bias", t4)  # type: ignore[arg-type]


@pytest.mark.parametrize("W, ep", [(4, 2), (4, 4), (2, 1)])
def test_distributed_step_equals_single_process_mean_loss(W: int, ep: int) -> None:
    El = 2
    problem = make_problem(W, ep, El, seed=W + ep)
    ref = reference_grads(problem)
    world = SimulatedWorld(W, timeout_s=20)

    def rank_fn(r: int):
        topo = world.topology(r, ep_degree=ep, ranks_per_node=2 if ep % 2 == 0 else 1)
        comm = world.communicator(r)
        out = {}
        for fused in (True, False):
            A, g, experts = build_params(problem, topo.ep_rank)
            ex = ExpertExchange(topo, El, communicator=comm, hierarchical=fused)
            rank_loss(problem, r, ex, A, g, experts).backward()
            params = [A, g] + experts
            if fused:
                GradientReducer(params, topo, comm, bucket_bytes=40).reduce()
            else:
                reduce_gradients_unfused(params, topo, comm)
            out[fused] = {"A": A.grad.numpy(), "g": g.grad.numpy(), "experts": np.stack([w.grad.numpy() for w in experts])}
        return topo.ep_rank, out

    res = world.run(rank_fn)
    for r, (ep_rank, out) in enumerate(res):
        for fused in (True, False):
            np.testing.assert_allclose(out[fused]["A"], ref["A"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out[fused]["g"], ref["g"], rtol=1e-5, atol=1e-6)
            mine = ref["experts"][ep_rank * El : (ep_rank + 1) * El]
            np.testing.assert_allclose(out[fused]["experts"], mine, rtol=1e-5, atol=1e-6)
        for k in ("A", "g", "experts"):
            np.testing.assert_array_equal(out[True][k], out[False][k])


def test_clip_grad_norm_counts_shared_once_and_sums_experts_over_ep() -> None:
    W, ep = 4, 2
    world = SimulatedWorld(W, timeout_s=20)
    dense = np.arange(6, dtype=np.float32).reshape(2, 3)
    gate = np.array([1.0, -2.0], np.float32)
    experts = [np.full((2, 2), r + 1.0, np.float32) for r in range(W)]

    def rank_fn(r: int):
        topo = world.topology(r, ep_degree=ep, ranks_per_node=2)
        d, g, e = _param([2, 3]), _param([2]), _param([2, 2])
        mark_params([g], "gate")
        mark_params([e], "expert")
        d.grad, g.grad, e.grad = paddle.to_tensor(dense), paddle.to_tensor(gate), paddle.to_tensor(experts[r])
        total = clip_grad_norm_([d, g, e], 1.0, topo, world.communicator(r))
        return total, d.grad.numpy(), e.grad.numpy()

    res = world.run(rank_fn)
    shared = float((dense**2).sum() + (gate**2).sum())
    for r, (total, dg, eg) in enumerate(res):
        group = [0, 1] if r < 2 else [2, 3]
        expected = np.sqrt(shared + sum(float((experts[q] ** 2).sum()) for q in group))
        assert total == pytest.approx(expected, rel=1e-6)
        np.testing.assert_allclose(dg, dense / (expected + 1e-6), rtol=1e-5)
        np.testing.assert_allclose(eg, experts[r] / (expected + 1e-6), rtol=1e-5)


def test_clip_is_a_noop_below_the_bound_and_single_process() -> None:
    p = _param([3])
    p.grad = paddle.to_tensor(np.array([0.3, 0.0, 0.4], np.float32))
    assert clip_grad_norm_([p], 1.0, Topology.single()) == pytest.approx(0.5)
    np.testing.assert_allclose(p.grad.numpy(), [0.3, 0.0, 0.4])
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([p], 0.0, Topology.single())


def test_missing_grad_counts_as_zero() -> None:
    world = SimulatedWorld(2, timeout_s=20)

    def rank_fn(r: int):
        topo = world.topology(r, ep_degree=2, ranks_per_node=2)
        p = _param([2])
        p.set_value(np.zeros(2, np.float32))
        if r == 0:
            p.grad = paddle.to_tensor(np.array([2.0, 4.0], np.float32))
        GradientReducer([p], topo, world.communicator(r)).reduce()
        return p.grad.numpy()

    for g in world.run(rank_fn):
        np.testing.assert_allclose(g, [1.0, 2.0])
