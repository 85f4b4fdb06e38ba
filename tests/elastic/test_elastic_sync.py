"""Gradient sync rules: pure rules, and the real sync on simulated ranks (threads) against the
full-batch gradient of one process, for the naive and the load-aware plans."""

from __future__ import annotations

import math

import numpy as np
import pytest

from paddle_semoe.comm import SimulatedWorld
from paddle_semoe.elastic.groups import TaskGroups, task_group_lists
from paddle_semoe.elastic.planner import plan_load_aware, plan_naive
from paddle_semoe.elastic.sync import ElasticGradSync, SyncRule, sample_weight, sync_rules

from tests.elastic import _ufo_problem as up


def test_rules_shared_over_world_tasks_over_their_group():
    plan = plan_load_aware(up.LOADS, 4)  # digit on ranks 0,1; parity 2; ge5 + rotation 3
    assert task_group_lists(plan) == [(0, 1), (2,), (3,), (3,)]
    assert sync_rules(plan, 0) == [SyncRule(None, (0, 1, 2, 3)), SyncRule(0, (0, 1))]
    assert sync_rules(plan, 3) == [SyncRule(None, (0, 1, 2, 3)), SyncRule(2, (3,)), SyncRule(3, (3,))]
    assert sample_weight(plan, 0, 0.5) == 0.5 / 8


def _reference_grads() -> tuple[dict[str, np.ndarray], float]:
    """One process hosting every task: gradient of the global objective."""
    plan = plan_naive(up.LOADS, 1)
    model = up.build(range(4))
    up.local_objective(model, plan, 0).backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values())))
    return grads, norm


@pytest.mark.parametrize("strategy, world", [("load_aware", 4), ("naive", 4), ("load_aware", 3), ("load_aware", 2)])
def test_synced_gradients_equal_the_full_batch_gradient(strategy, world):
    ref, ref_norm = _reference_grads()
    plan = plan_load_aware(up.LOADS, world) if strategy == "load_aware" else plan_naive(up.LOADS, world)
    sim = SimulatedWorld(world, timeout_s=60)

    def rank_fn(r: int):
        model = up.build(plan.rank_tasks(r))
        named = list(model.named_parameters())
        sync = ElasticGradSync(named, plan, TaskGroups.from_handles(plan, r), sim.communicator(r), bucket_bytes=2048)
        loss = up.local_objective(model, plan, r)
        if loss is not None:
            loss.backward()
        sync.reduce()
        norm = sync.clip_(math.inf)
        return {n: p.grad.numpy() for n, p in named if p.grad is not None}, norm, len(sync.buckets)

    results = sim.run(rank_fn)
    seen = set()
    for r, (grads, norm, nbuckets) in enumerate(results):
        assert nbuckets > 2  # the small cap splits the shared parameters over several buckets
        assert norm == pytest.approx(ref_norm, rel=1e-5)
        for name, g in grads.items():
            np.testing.assert_allclose(g, ref[name], rtol=2e-4, atol=2e-6, err_msg=f"rank {r} {name}")
            seen.add(name)
    assert seen == set(ref), sorted(set(ref) ^ seen)


def test_sync_refuses_parameters_of_tasks_the_plan_puts_elsewhere():
    plan = plan_load_aware(up.LOADS, 4)
    model = up.build([0, 1])  # rank 0 only hosts digit
    with pytest.raises(ValueError, match=r"holds parameters of tasks \['parity'\]"):
        ElasticGradSync(list(model.named_parameters()), plan, TaskGroups.from_handles(plan, 0), None)


def test_clip_scales_every_gradient_by_the_global_norm():
    plan = plan_naive(up.LOADS, 1)
    model = up.build(range(4))
    up.local_objective(model, plan, 0).backward()
    named = list(model.named_parameters())
    before = {n: p.grad.numpy().copy() for n, p in named}
    sync = ElasticGradSync(named, plan, TaskGroups.from_handles(plan, 0), None)
    norm = sync.clip_(0.01)
    assert norm > 0.01
    for n, p in named:
        np.testing.assert_allclose(p.grad.numpy(), before[n] * (0.01 / (norm + 1e-6)), rtol=1e-5, atol=1e-9)
    assert sync.clip_(math.inf) == pytest.approx(0.01, rel=1e-4)
