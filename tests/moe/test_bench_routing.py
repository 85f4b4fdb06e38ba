"""tools/bench_routing.py end to end at a toy size: every number present, JSON and PNG written."""

import importlib.util
import json
import sys
from pathlib import Path


TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_routing.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_routing", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_bench_routing_smoke(tmp_path, capsys):
    bench = _load()
    names = ["top2 token-major (old)", "fine-grained 4x + shared", "aux-free (sigmoid)"]
    report = bench.main(["--steps", "3", "--eval-windows", "2", "--batch", "4", "--routers", ",".join(names),
                         "-o", "model.n_layers=2", "-o", "data.seq_len=16", "--out", str(tmp_path)])
    assert [r["router"] for r in report["results"]] == names
    for r in report["results"]:
        assert r["val_loss"] > 0 and r["tokens_per_s"] > 0 and r["load_max_over_mean"] >= 1.0
        assert 0.0 <= r["expertless_fraction"] <= r["dropped_fraction"] + 1e-9 or r["dropped_fraction"] == 0.0
        assert len(r["dropped_by_choice"]) >= 1
    fine = report["results"][1]
    assert len(fine["dropped_by_choice"]) == 4 * 2 - 4  # k*f - f routed choices
    assert report["results"][2]["balance_bias_abs_mean"] > 0  # the bias moved
    saved = json.loads((tmp_path / "bench_routing.json").read_text())
    assert saved["results"] == report["results"]
    assert (tmp_path / "bench_routing.png").stat().st_size > 0  # tools/_env_test.sh installs matplotlib
    assert "expert-less" in capsys.readouterr().out
