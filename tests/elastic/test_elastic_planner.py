"""The load-aware planner and the naive baseline: assignments, predicted times, validation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from paddle_semoe.elastic.planner import (
    Plan,
    Shard,
    TaskLoad,
    explain_plan,
    make_plan,
    plan_load_aware,
    plan_naive,
    split_evenly,
)

PAPER = [TaskLoad("a", 512, 1.0), TaskLoad("b", 256, 1.0), TaskLoad("c", 128, 1.0), TaskLoad("d", 128, 1.0)]


def _placement(plan: Plan) -> dict[str, list[tuple[int, int]]]:
    return {
        t.name: sorted((s.rank, s.count) for s in plan.shards if s.task == i) for i, t in enumerate(plan.tasks)
    }


def test_naive_is_one_rank_per_task_and_idles_the_light_ranks():
    p = plan_naive(PAPER, 4)
    assert _placement(p) == {"a": [(0, 512)], "b": [(1, 256)], "c": [(2, 128)], "d": [(3, 128)]}
    assert p.busy() == [512.0, 256.0, 128.0, 128.0]
    assert p.idle() == [0.0, 256.0, 384.0, 384.0]
    assert p.step_time == 512.0


def test_paper_example_on_4_ranks_splits_the_heavy_task_and_packs_the_light_ones():
    p = plan_load_aware(PAPER, 4)
    assert _placement(p) == {"a": [(0, 256), (1, 256)], "b": [(2, 256)], "c": [(3, 128)], "d": [(3, 128)]}
    assert p.busy() == [256.0] * 4 and p.idle() == [0.0] * 4
    assert p.task_ranks(0) == (0, 1) and p.rank_tasks(3) == (2, 3)
    assert p.owner(0) == 0 and p.owner(3) == 3
    assert plan_naive(PAPER, 4).step_time / p.step_time == 2.0


@pytest.mark.parametrize(
    "world, expected",
    [
        (1, {"a": [(0, 512)], "b": [(0, 256)], "c": [(0, 128)], "d": [(0, 128)]}),
        (2, {"a": [(0, 512)], "b": [(1, 256)], "c": [(1, 128)], "d": [(1, 128)]}),
        (8, {"a": [(0, 128), (1, 128), (2, 128), (3, 128)], "b": [(4, 128), (5, 128)], "c": [(6, 128)], "d": [(7, 128)]}),
    ],
)
def test_paper_example_on_other_world_sizes(world, expected):
    p = plan_load_aware(PAPER, world)
    assert _placement(p) == expected
    assert p.step_time == 1024.0 / world


def test_overheads_are_charged_per_task_on_a_rank():
    tasks = [TaskLoad("x", 10, 1.0, overhead_s=5.0), TaskLoad("y", 10, 1.0, overhead_s=5.0)]
    p = plan_load_aware(tasks, 1)
    assert p.busy() == [30.0]  # 2 x (5 + 10)
    # two ranks: each task on its own rank beats splitting anything
    p2 = plan_load_aware(tasks, 2)
    assert _placement(p2) == {"x": [(0, 10)], "y": [(1, 10)]} and p2.busy() == [15.0, 15.0]


def test_uneven_split_gives_the_extra_samples_to_the_first_ranks():
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(2, 4) == [1, 1, 0, 0]
    p = plan_load_aware([TaskLoad("x", 10, 1.0)], 3)
    assert [(s.rank, s.start, s.count) for s in p.shards] == [(0, 0, 4), (1, 4, 3), (2, 7, 3)]
    assert p.step_time == 4.0


def test_more_ranks_than_samples_leaves_ranks_idle_with_a_note():
    p = plan_load_aware([TaskLoad("x", 1, 1.0), TaskLoad("y", 1, 1.0)], 4)
    assert p.step_time == 1.0 and p.rank_tasks(3) == ()
    assert any("host no task" in n for n in p.notes)


def _brute_force_makespan(tasks: list[TaskLoad], W: int) -> float:
    """Best makespan over every plan of the planner's family (dedicated k_t >= 1 ranks, or whole
    on one of S shared ranks, any packing)."""
    best = math.inf
    T = len(tasks)
    for light_mask in itertools.product([False, True], repeat=T):
        heavy = [t for t in range(T) if not light_mask[t]]
        light = [t for t in range(T) if light_mask[t]]
        for S in (range(1, len(light) + 1) if light else [0]):
            D = W - S
            if D < len(heavy) or (not heavy and D):
                continue
            for ks in itertools.product(range(1, D + 1), repeat=len(heavy)):
                if sum(ks) != D:
                    continue
                hb = [tasks[t].busy(math.ceil(tasks[t].batch_size / k)) for t, k in zip(heavy, ks)]
                for bins in itertools.product(range(S), repeat=len(light)):
                    lb = [0.0] * S
                    for t, b in zip(light, bins):
                        lb[b] += tasks[t].busy(tasks[t].batch_size)
                    best = min(best, max(hb + lb))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_load_aware_is_near_the_best_plan_of_its_family_and_never_worse_than_naive(seed):
    rng = np.random.default_rng(seed)
    T, W = int(rng.integers(2, 5)), int(rng.integers(2, 6))
    tasks = [
        TaskLoad(f"t{i}", int(rng.integers(1, 40)), float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.0, 3.0)))
        for i in range(T)
    ]
    p = plan_load_aware(tasks, W)
    best = _brute_force_makespan(tasks, W)
    assert p.step_time <= plan_naive(tasks, W).step_time + 1e-9
    # greedy rank allocation is exact for the heavy part; LPT packing is within 4/3 of optimal
    assert best - 1e-9 <= p.step_time <= best * 4 / 3 + 1e-9, (tasks, W, p.step_time, best)


def test_plan_validation_names_the_problem():
    tasks = (TaskLoad("a", 4, 1.0), TaskLoad("b", 2, 1.0))
    with pytest.raises(ValueError, match="do not tile"):
        Plan(2, tasks, (Shard(0, 0, 0, 2), Shard(0, 1, 3, 1), Shard(1, 1, 0, 2)), "load_aware")
    with pytest.raises(ValueError, match="cover 3 samples, batch_size is 4"):
        Plan(2, tasks, (Shard(0, 0, 0, 3), Shard(1, 1, 0, 2)), "load_aware")
    with pytest.raises(ValueError, match="'b' is assigned to no rank"):
        Plan(2, tasks, (Shard(0, 0, 0, 4),), "load_aware")
    with pytest.raises(ValueError, match="names rank 5"):
        Plan(2, tasks, (Shard(0, 5, 0, 4), Shard(1, 1, 0, 2)), "load_aware")
    with pytest.raises(ValueError, match="unique"):
        Plan(1, (TaskLoad("a", 1, 1.0), TaskLoad("a", 1, 1.0)), (Shard(0, 0, 0, 1), Shard(1, 0, 0, 1)), "naive")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TaskLoad("a", 0, 1.0)
    with pytest.raises(ValueError, match="per_sample_s must be positive"):
        TaskLoad("a", 1, -1.0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        make_plan("greedy", tasks, 2)


def test_plan_round_trips_through_a_dict():
    p = plan_load_aware(PAPER, 4)
    assert Plan.from_dict(p.to_dict()) == p


def test_explanation_names_loads_assignment_and_the_predicted_gain():
    text = explain_plan(plan_load_aware(PAPER, 4), plan_naive(PAPER, 4), "config")
    assert "costs: config" in text
    assert "  a               512" in text and "512000.00   50.0%" in text
    assert "0(256), 1(256)  [DP x2]" in text
    assert "rank 3: c[0:128] + d[0:128]" in text
    assert "x2.00 (+100%) against the naive plan" in text
    assert "idle ms [0.00, 256000.00, 384000.00, 384000.00]" in text
