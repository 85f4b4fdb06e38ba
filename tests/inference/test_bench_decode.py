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
