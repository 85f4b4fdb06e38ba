"""Smoke run of the decode benchmark (tools/bench_infer.py --decode) at toy size: the report
carries every figure the acceptance asks for, with consistent values (no timings asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_infer", ROOT / "tools" / "bench_infer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decode_benchmark_reports_every_figure(tmp_path):
    out = tmp_path / "dec.json"
    report = _bench().main(["--decode", "--d-model", "32", "--d-ff", "32", "--experts", "16", "--top-k", "2",
                            "--moe-layers", "2", "--budget", "0.5", "--prompt", "4", "--new", "3", "--batches", "1,2", "--threads", "1",
                            "--workdir", str(tmp_path), "--json", str(out)])
    assert json.loads(out.read_text())["config"]["total_experts"] == 32
    assert [row["batch"] for row in report["decode"]] == [1, 2]
    q = report["int8_quality"]
    assert q["tokens_scored"] > 0 and 0.0 <= q["token_agreement"] <= 1.0 and q["max_abs_logit_diff"] > 0
    assert abs(q["loss_delta"] - (q["loss_test"] - q["loss_ref"])) < 1e-12
    for row in report["decode"]:
        modes = row["modes"]
        assert set(modes) == {"resident", "ring", "cache", "cache_noprefetch", "cache_int8"}
        assert modes["resident"]["bytes_read"] == 0 and modes["resident"]["vs_resident"] == 1.0
        # without prefetch the live cache is demand paging: never above the offline optimum
        assert modes["cache_noprefetch"]["hit_rate"] <= modes["cache_noprefetch"]["belady_hit_rate"] + 1e-9
        for name in ("cache", "cache_int8"):
            m = modes[name]
            assert 0.0 <= m["pregate_precision"] <= 1.0 and 0.0 <= m["pregate_recall"] <= 1.0
            assert m["resident_expert_bytes"] <= report["config"]["budget_bytes"]
        f32, i8 = modes["cache"], modes["cache_int8"]
        if f32["loads"] and i8["loads"]:  # an int8 load reads a quarter of a float32 load's bytes
            assert i8["bytes_read"] / i8["loads"] * 4 == f32["bytes_read"] / f32["loads"]


def test_decode_benchmark_int4_mode(tmp_path):
    report = _bench().main(["--decode", "--d-model", "32", "--d-ff", "64", "--experts", "8", "--top-k", "2",
                            "--moe-layers", "2", "--budget", "0.25", "--prompt", "4", "--new", "3", "--batches", "1",
                            "--threads", "1", "--modes", "resident,cache,cache_int4", "--workdir", str(tmp_path)])
    modes = report["decode"][0]["modes"]
    assert set(modes) == {"resident", "cache", "cache_int4"}
    f32, i4 = modes["cache"], modes["cache_int4"]
    assert i4["resident_expert_bytes"] <= report["config"]["budget_bytes"]
    if f32["loads"] and i4["loads"]:  # an int4 load reads less than a quarter of a float32 load (scales included)
        assert i4["bytes_read"] / i4["loads"] < f32["bytes_read"] / f32["loads"] / 4


def test_decode_benchmark_on_a_package_pools_prompt_sets(tmp_path):
    """--package: the benchmark serves a given package (here a small random one) with held-out
    text prompts; --prompt-sets pools each mode over several prompt sets."""
    from paddle_semoe.inference.export import export_package

    bench = _bench()
    model = bench._random_model(16, 32, 2, 32, 8, 2)
    pkg = export_package(model, tmp_path / "pkg", graphs=False, int8=True)
    report = bench.main(["--decode", "--package", str(pkg), "--prompt", "4", "--new", "3", "--batches", "2",
                         "--prompt-sets", "3", "--budget", "0.5", "--threads", "1",
                         "--modes", "resident,cache,cache_noprefetch", "--workdir", str(tmp_path)])
    assert report["config"]["package"] == str(pkg) and report["config"]["prompt_sets"] == 3
    modes = report["decode"][0]["modes"]
    for m in modes.values():
        assert m["prompt_sets"] == 3
        assert abs(m["tokens"] - 3 * 2 * 3) < 1e-6  # 3 sets x batch 2 x 3 steps
    nop = modes["cache_noprefetch"]
    assert nop["hit_rate"] <= nop["belady_hit_rate"] + 1e-9
    assert abs(nop["hit_rate"] - nop["load_hit_rate"]) < 1e-9  # demand paging: every load is a miss


def test_pool_runs_sums_counts_and_averages_rates():
    pool = _bench()._pool_runs
    runs = [
        {"tokens_per_s": 10.0, "seconds": 1.0, "loads": 2, "bytes_read": 100, "exposed_load_s": 0.1, "io_floor_s": 0.2,
         "hit_rate": 0.5, "belady_hit_rate": 0.7, "slots": 4,
         "policy_replay": {"belady": {"hit": 0.7, "load": 0.7}}},
        {"tokens_per_s": 30.0, "seconds": 1.0, "loads": 4, "bytes_read": 300, "exposed_load_s": 0.3, "io_floor_s": 0.2,
         "hit_rate": 0.7, "belady_hit_rate": 0.9, "slots": 4,
         "policy_replay": {"belady": {"hit": 0.9, "load": 0.9}}},
    ]
    p = pool(runs)
    assert p["tokens"] == 40.0 and p["tokens_per_s"] == 20.0 and p["loads"] == 6 and p["bytes_per_token"] == 10.0
    assert abs(p["exposed_vs_floor"] - 1.0) < 1e-12 and abs(p["hit_rate"] - 0.6) < 1e-12
    assert abs(p["policy_replay"]["belady"]["load"] - 0.8) < 1e-12 and p["slots"] == 4 and p["prompt_sets"] == 2


def test_decode_benchmark_refuses_a_bad_package_in_one_line(tmp_path):
    import pytest

    from paddle_semoe.inference.export import export_package

    bench = _bench()
    with pytest.raises(SystemExit, match="--package: inference package not found"):
        bench.main(["--decode", "--package", str(tmp_path / "missing"), "--workdir", str(tmp_path)])
    pkg = export_package(bench._random_model(16, 32, 2, 32, 8, 2), tmp_path / "pkg", graphs=False)
    with pytest.raises(SystemExit, match="max_seq_len 16 is shorter than --prompt \\+ --new = 40"):
        bench.main(["--decode", "--package", str(pkg), "--prompt", "8", "--new", "32", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no int8 expert sections for the cache_int8 mode"):
        bench.main(["--decode", "--package", str(pkg), "--prompt", "4", "--new", "3", "--modes", "cache_int8",
                    "--workdir", str(tmp_path)])
