"""Cost per sample: line fit and the profiling loop (with a fake clock)."""

from __future__ import annotations

import pytest

from paddle_semoe.elastic.cost import MIN_PER_SAMPLE_S, fit_linear_cost, profile_task_costs


def test_fit_recovers_an_exact_line():
    fit = fit_linear_cost([4, 16, 4, 16], [0.005 + 4e-3, 0.005 + 16e-3, 0.005 + 4e-3, 0.005 + 16e-3])
    assert fit.per_sample_s == pytest.approx(1e-3, rel=1e-9)
    assert fit.overhead_s == pytest.approx(0.005, rel=1e-9)


def test_fit_floors_a_negative_slope_and_intercept():
    fit = fit_linear_cost([1, 2], [0.02, 0.01])
    assert fit.per_sample_s == pytest.approx(0.03 / 3) and fit.overhead_s == 0.0
    fit = fit_linear_cost([1, 3], [0.0, 0.0])
    assert fit.per_sample_s == MIN_PER_SAMPLE_S


def test_fit_needs_two_distinct_sizes():
    with pytest.raises(ValueError, match="two distinct batch sizes"):
        fit_linear_cost([4, 4], [1.0, 1.0])
    with pytest.raises(ValueError, match=">= 2 points"):
        fit_linear_cost([4], [1.0])


def test_profile_times_each_task_at_two_sizes():
    now = [0.0]
    calls = []
    costs = {0: (0.01, 0.002), 1: (0.03, 0.001)}

    def run_task(task: int, n: int) -> None:
        calls.append((task, n))
        a, b = costs[task]
        now[0] += a + b * n

    fits = profile_task_costs(run_task, 2, lambda t: (2, 8), repeats=2, warmup=1, clock=lambda: now[0])
    assert calls == [(0, 8), (0, 2), (0, 8), (0, 2), (0, 8), (1, 8), (1, 2), (1, 8), (1, 2), (1, 8)]
    for t, f in enumerate(fits):
        assert f.overhead_s == pytest.approx(costs[t][0], rel=1e-6)
        assert f.per_sample_s == pytest.approx(costs[t][1], rel=1e-6)
