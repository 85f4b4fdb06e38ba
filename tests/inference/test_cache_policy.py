"""Eviction policies of the expert cache and their offline replay (inference/cache_policy.py):
exact hit counts on hand-built traces, Belady as the bound, and the live ExpertCache driven by
the same policy objects (its demand hits equal the replay of its recorded trace)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_semoe.inference.cache import CacheStats, belady_hit_rate, routing_requests
from paddle_semoe.inference.cache_policy import (
    ARCPolicy,
    LayerDistancePolicy,
    LFUDecayPolicy,
    LRUPolicy,
    NextUsePolicy,
    PartitionedPolicy,
    PregateAwarePolicy,
    Trace,
    belady_hit_rate_of,
    belady_hits,
    compare,
    replay,
    static_optimum_hit_rate,
)
from paddle_semoe.inference.export import export_package
from paddle_semoe.inference.package import read_manifest
from paddle_semoe.inference.runner import InferenceModel, ServeConfig
from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings


def _single(seq, experts=8, start=0):
    """One layer, one key per request."""
    return Trace.of(1, experts, [(0, [k]) for k in seq], start=start)


# ----------------------------------------------------------------------------- Belady
def test_belady_hits_per_request_and_window():
    seq = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]  # the classic MIN example: 5 hits of 12 at capacity 3
    hits = belady_hits([[k] for k in seq], 3)
    assert hits == [0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1]
    assert belady_hit_rate([[k] for k in seq], 3, start=4) == pytest.approx(5 / 8)
    assert belady_hit_rate_of(_single(seq, start=4), 3) == pytest.approx(5 / 8)
    assert belady_hit_rate_of(_single([1, 2, 3, 1, 4, 2, 1]), 3) == pytest.approx(3 / 7)


def test_static_optimum_counts_the_window_top_keys():
    # window from request 2: keys 1 x3, 2 x2, 3 x1; two slots hold 1 and 2 -> 5 of 6
    t = _single([4, 4, 1, 2, 1, 3, 2, 1], start=2)
    assert static_optimum_hit_rate(t, 2) == pytest.approx(5 / 6)
    assert static_optimum_hit_rate(t, 9) == 1.0


def test_trace_validation_names_the_problem():
    with pytest.raises(ValueError, match="layer 2, the trace has 2 layers"):
        Trace.of(2, 4, [(2, [0])])
    with pytest.raises(ValueError, match="outside 0..3"):
        Trace.of(2, 4, [(0, [4])])
    with pytest.raises(ValueError, match="start 3 outside"):
        Trace.of(1, 4, [(0, [0])], start=3)
    with pytest.raises(ValueError, match="more than capacity"):
        replay(Trace.of(1, 4, [(0, [0, 1, 2])]), 2, LRUPolicy())


# ----------------------------------------------------------------------------- policies, demand paging
def test_lru_hand_trace():
    r = replay(_single([1, 2, 3, 1, 4, 2, 1]), 3, LRUPolicy())  # 4 evicts 2, 2 evicts 3, then 1 hits
    assert (r.hits, r.demand_loads, r.prefetch_loads, r.requests) == (2, 5, 0, 7)
    assert r.hit_rate == r.load_hit_rate == pytest.approx(2 / 7)


def test_lfu_keeps_the_frequent_key_where_lru_drops_it():
    seq = [1, 1, 2, 3, 1, 3]
    assert replay(_single(seq), 2, LFUDecayPolicy(beta=1.0)).hits == 3  # 3 evicts 2 (fewer hits), 1 and 3 hit
    assert replay(_single(seq), 2, LRUPolicy()).hits == 2


def test_lfu_decay_forgets_old_popularity():
    seq = [1, 1, 1, 2, 2, 3, 2]
    assert replay(_single(seq), 2, LFUDecayPolicy(beta=1.0)).hits == 3  # 3 evicts 2 (2 hits < 3)
    # halving every pass: key 1 has 0.22 left when 3 arrives, key 2 0.75, so 1 goes and 2 hits
    assert replay(_single(seq), 2, LFUDecayPolicy(beta=0.5)).hits == 4


def test_layer_distance_keeps_the_layer_that_runs_next():
    # 2 layers x 2 experts (keys 0,1 | 2,3), 2 slots. At request 3 (layer 1) key 1 (layer 0, 1.5
    # hits, runs next) beats key 2 (0.5 hits); at request 4 (layer 0) key 3 (layer 1, next, 0.5/1)
    # beats key 1 (0.75 hits / 2 layers away), so key 3 hits at request 5; plain LFU keeps key 1.
    t = Trace.of(2, 2, [(0, [1]), (1, [0]), (0, [1]), (1, [1]), (0, [0]), (1, [1])])
    assert replay(t, 2, LayerDistancePolicy(beta=0.5)).hits == 2
    assert replay(t, 2, LFUDecayPolicy(beta=0.5)).hits == 1


def test_layer_distance_speculative_margin():
    p = LayerDistancePolicy(beta=1.0)
    p.reset(2, 2, 2)
    p.record(0, [0])
    p.record(0, [0])  # key 0: 2 hits, distance 2 from layer 0; key 2: none
    assert p.victim(np.array([0]), 2, speculative=True) is None  # 0 < 2 / 2
    assert p.victim(np.array([0]), 2, speculative=False) == 0
    with pytest.raises(ValueError, match="margin must be > 0"):
        LayerDistancePolicy(margin=0.0)


def test_next_use_estimate_and_prediction_confidence():
    p = NextUsePolicy(beta=0.9, prior=0.05, confidence=0.99)
    p.reset(1, 3, 2)
    p.record(0, [0])
    p.record(0, [0, 1])  # hits 1.9, 1.0, 0; 1.9 passes: next use ~ 1/p passes away
    keep = p.keep(np.arange(3))
    np.testing.assert_allclose(keep, [-2.9 / 1.95, -2.9 / 1.05, -2.9 / 0.05])
    assert p.victim(np.arange(3), 0, False) == 2
    p.predict(0, [2])  # predicted for the next pass: expected at distance 1 + 1% of the rest
    np.testing.assert_allclose(p.keep(np.array([2])), [-(1 + 0.01 * (2.9 / 0.05 - 1))])
    assert p.victim(np.arange(3), 0, False) == 1


def test_partitioned_keeps_each_layer_its_quota():
    # 2 layers x 4 experts, 2 slots: one per layer. Global LRU lets layer 1 take both slots.
    t = Trace.of(2, 4, [(0, [0]), (1, [0]), (1, [1]), (0, [0])])
    assert replay(t, 2, PartitionedPolicy(LRUPolicy())).hits == 1
    assert replay(t, 2, LRUPolicy()).hits == 0


def test_arc_hand_trace_and_ghost_lists():
    arc = ARCPolicy()
    r = replay(_single([1, 2, 1, 3, 2, 1]), 2, arc)
    assert r.hits == 1
    # 2 came back from ghost B1 (p -> 1), 1 from ghost B2 (p -> 0); 3 is the last T1 victim
    assert (list(arc.t1), list(arc.t2), list(arc.b1), list(arc.b2), arc.p) == ([], [2, 1], [3], [], 0.0)


def test_pregate_aware_never_evicts_the_predicted_key():
    # 2 layers x 2 experts; key 2 (layer 1) is the LRU key when request 2 misses, but pre-gating
    # named it for layer 1, which runs next
    t = Trace.of(2, 2, [(1, [0]), (0, [0]), (0, [1]), (1, [0])], predictions=[(2, 1, [0])])
    assert replay(t, 2, PregateAwarePolicy(LRUPolicy()), prefetch=False).hits == 1
    assert replay(t, 2, LRUPolicy(), prefetch=False).hits == 0


# ----------------------------------------------------------------------------- prefetch accounting
def test_prefetch_hits_count_live_and_every_load_counts_in_the_load_rate():
    # one layer, 2 slots, LRU; before request 1 pre-gating predicts keys 1 (used) and 3 (wasted)
    t = Trace.of(1, 4, [(0, [0]), (0, [1]), (0, [2])], predictions=[(1, 0, [1, 3])])
    r = replay(t, 2, LRUPolicy())
    assert (r.requests, r.hits, r.demand_loads, r.prefetch_loads, r.prefetch_used) == (3, 1, 2, 2, 1)
    assert r.hit_rate == pytest.approx(1 / 3) and r.load_hit_rate == pytest.approx(1 - 4 / 3)
    w = replay(Trace(t.layers, t.experts, t.requests, t.predictions, start=1), 2, LRUPolicy())
    assert (w.requests, w.hits, w.demand_loads, w.prefetch_loads) == (2, 1, 1, 2)
    off = replay(t, 2, LRUPolicy(), prefetch=False)
    assert (off.hits, off.prefetch_loads) == (0, 0) and off.hit_rate == off.load_hit_rate == 0.0


def test_no_policy_beats_belady_on_random_traces():
    rng = np.random.default_rng(3)
    for trial in range(20):
        L, E, cap = 3, 6, int(rng.integers(3, 9))
        reqs = [(i % L, rng.choice(E, size=int(rng.integers(1, 4)), replace=False)) for i in range(60)]
        preds = [(i, (i + 1) % L, rng.choice(E, 2, replace=False)) for i in range(0, 60, 2)]
        t = Trace.of(L, E, reqs, preds)  # MIN needs the fewest loads, also against any prefetching
        res = compare(t, cap)
        best = res.pop("belady")["load"]
        assert res.pop("static_optimum")["load"] == pytest.approx(static_optimum_hit_rate(t, cap))
        for name, d in res.items():
            assert d["load"] <= best + 1e-12, (trial, name)
            if not name.endswith("+prefetch"):
                assert d["hit"] == pytest.approx(d["load"])


def test_cache_stats_load_hit_rate():
    cs = CacheStats(accesses=10, hits=6, misses=4, prefetch_loads=3)
    assert cs.loads == 7 and cs.hit_rate == pytest.approx(0.6) and cs.load_hit_rate == pytest.approx(0.3)
    assert CacheStats().load_hit_rate == 0.0


# ----------------------------------------------------------------------------- the live cache
E = 8


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    paddle.seed(11)
    cfg = GPTConfig(d_model=32, n_layers=3, n_heads=4, d_ff=64, max_seq_len=40, moe_every=1,
                    moe=MoESettings(num_experts=E, top_k=2))
    model = GPTMoE(cfg)
    for p in model.parameters():
        p.set_value(p * 8.0 if len(p.shape) >= 2 else p)
    return export_package(model, tmp_path_factory.mktemp("pkg") / "pkg", graphs=False)


def _prompts(B=2, P=5):
    return np.random.default_rng(4).integers(0, 256, (B, P)).astype(np.int64)


@pytest.mark.parametrize("policy", [None, LRUPolicy(), PartitionedPolicy(LFUDecayPolicy(0.9)), NextUsePolicy(0.9), ARCPolicy()],
                         ids=["default", "lru", "partitioned", "next_use", "arc"])
def test_live_cache_demand_hits_equal_the_replay_and_stay_bit_exact(package, policy):
    man = read_manifest(package)
    ref = InferenceModel.load(man, ServeConfig(mode="resident", source="host"))
    want = ref.generate(_prompts(), 8).tokens
    ref.close()
    m = InferenceModel.load(man, ServeConfig(mode="cache", num_slots=8, source="host", prefetch=False,
                                             record_routing=True))
    if policy is not None:  # swap the policy before any use (the runner builds the default one)
        m.experts.policy = policy
        policy.reset(m.experts.geo.layers, E, m.experts.num_slots)
    got = m.generate(_prompts(), 8).tokens
    cs, routing = m.experts.cache_stats, m.experts.routing
    m.close()
    np.testing.assert_array_equal(got, want)
    t = Trace.of(len(man.sections), E, routing)
    again = replay(t, 8, policy if policy is not None else LayerDistancePolicy(0.9), prefetch=False)
    assert (again.requests, again.hits, again.demand_loads) == (cs.accesses, cs.hits, cs.misses)
    assert cs.hits <= belady_hit_rate(routing_requests(routing, E), 8) * cs.accesses + 1e-9


def test_live_cache_records_predictions_and_counts_every_load(package):
    man = read_manifest(package)
    m = InferenceModel.load(man, ServeConfig(mode="cache", num_slots=8, source="host", prefetch=True,
                                             record_routing=True))
    m.generate(_prompts(1, 4), 8)
    ex = m.experts
    cs, routing, preds = ex.cache_stats, ex.routing, ex.predictions
    m.close()
    L = len(man.sections)
    assert len(preds) == (len(routing) // L) * (L - 1)  # layers 1..L-1 predicted once per forward
    for before, j, ids in preds:  # issued in layer j-1's pre-hook, before its request
        assert routing[before][0] == j - 1 and len(ids) > 0
    assert cs.prefetch_loads > 0 and cs.loads == cs.misses + cs.prefetch_loads
    assert cs.load_hit_rate == pytest.approx(1 - cs.loads / cs.accesses) and cs.load_hit_rate < cs.hit_rate
    t = Trace.of(L, E, routing, preds)
    assert cs.load_hit_rate <= belady_hit_rate_of(t, 8) + 1e-12


def test_decode_benchmark_reports_live_load_based_and_belady_rates(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_infer", Path(__file__).resolve().parents[2] / "tools" / "bench_infer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--decode", "--d-model", "32", "--d-ff", "32", "--experts", "16", "--top-k", "2",
                         "--moe-layers", "2", "--budget", "0.5", "--prompt", "4", "--new", "4", "--batches", "2",
                         "--threads", "1", "--modes", "cache,cache_noprefetch", "--workdir", str(tmp_path)])
    modes = report["decode"][0]["modes"]
    live, demand = modes["cache"], modes["cache_noprefetch"]
    assert demand["load_hit_rate"] == pytest.approx(demand["hit_rate"])  # demand paging: one load per miss
    assert live["load_hit_rate"] <= live["hit_rate"] and live["prefetch_loads"] > 0
    rep = live["policy_replay"]  # replayed on the prefetching run's trace; routing is the same in both runs
    assert rep["belady"]["load"] == pytest.approx(live["belady_hit_rate"]) == pytest.approx(demand["belady_hit_rate"])
    # the live demand-paged cache is exactly its policy replayed on the trace
    assert rep["lfu_decay_dist"]["hit"] == pytest.approx(demand["hit_rate"])
    assert "ld-hit" in bench.format_decode_table(report)
