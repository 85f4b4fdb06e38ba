"""The planner's per-machine formulas, the shipped cluster descriptions and tools/plan.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from paddle_semoe.storage.capacity import (
    GIB,
    ClusterSpec,
    MachineSpec,
    ModelSpec,
    cluster_from_dict,
    cpu_knobs,
    format_plan,
    model_from_dict,
    plan,
)

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "configs" / "clusters"


def _cluster(n=2, dev=10.0, host=100.0, ssd=1000.0):
    return ClusterSpec("c", n, MachineSpec(1, dev * GIB, host * GIB, ssd * GIB))


def test_the_three_formulas_per_machine():
    D, S, L, a, N = 1e9, 64e9, 16, 0.25, 2
    p = plan(ModelSpec("m", D, S, L, a), _cluster(n=N))
    dev, host, ssd = p.tiers
    assert dev.bytes_per_machine == pytest.approx((16 * D + 4 * a * S / L) / N)
    assert host.bytes_per_machine == pytest.approx(16 * a * S / N)
    assert ssd.bytes_per_machine == pytest.approx(12 * S / N)
    assert p.resident_bytes_per_machine == pytest.approx(16 * (D + S) / N)
    # 16 aS / N <= 100 GiB  <=>  a <= 100 GiB * N / (16 S)
    assert p.max_alpha_host == pytest.approx(100 * GIB * N / (16 * S))
    assert [t.fits for t in p.tiers] == [True, False, True] and not p.fits
    text = format_plan(p)
    assert "DOES NOT FIT: host short by" in text and f"host fits up to alpha={p.max_alpha_host:.3g}" in text


def test_device_limit_on_alpha_and_the_dense_part_alone():
    p = plan(ModelSpec("m", 1e9, 64e9, 16, 1.0), _cluster(n=1, dev=20.0, host=2000.0))
    # device: 16 GB dense + 4 a 64e9 / 16 <= 20 GiB  ->  a <= (20 GiB - 16e9) * 16 / (4 * 64e9)
    assert p.max_alpha_device == pytest.approx((20 * GIB - 16e9) * 16 / (4 * 64e9))
    assert not p.tiers[0].fits
    tiny = plan(ModelSpec("m", 4e9, 1e9, 1, 0.5), _cluster(n=1, dev=10.0))
    assert tiny.max_alpha_device == 0.0 and "the dense states alone do not fit" in format_plan(tiny)


@pytest.mark.parametrize("name", ["ufo_12b_6x8_a100.yaml", "gpt_moe_104b_8x8_a100.yaml", "cpu_this_machine.yaml"])
def test_shipped_cluster_descriptions_load_and_fit(name):
    from paddle_semoe.config.yaml_files import load_yaml_with_bases
    from paddle_semoe.engine.plan import model_spec_from_train_config

    raw = load_yaml_with_bases(CLUSTERS / name)
    cluster = cluster_from_dict(raw, name)
    model = model_from_dict(raw["model"], base_dir=CLUSTERS, count_train_config=model_spec_from_train_config)
    p = plan(model, cluster)
    assert p.fits, format_plan(p)
    if name.startswith("ufo"):
        assert cluster.machines * cluster.machine.devices == 48 and model.sparse_params + model.dense_params == pytest.approx(12e9)
    if name.startswith("gpt"):
        assert cluster.machines * cluster.machine.devices == 64 and model.sparse_params + model.dense_params == pytest.approx(104e9)
    if name.startswith("cpu"):  # counted from configs/storage/bench_expert_heavy.yaml
        assert model.moe_layers == 4 and model.sparse_params == 4 * 64 * (2 * 256 * 1024 + 1024 + 256)


def test_bad_descriptions_name_the_key():
    base = {"name": "x", "machines": 1, "machine": {"devices": 1, "device_memory_gb": 1, "host_memory_gb": 1, "ssd_gb": 1}}
    with pytest.raises(ValueError, match="unknown key 'ssd' \\(did you mean 'ssd_gb'\\?\\)"):
        cluster_from_dict({**base, "machine": {"devices": 1, "device_memory_gb": 1, "host_memory_gb": 1, "ssd": 1}})
    with pytest.raises(ValueError, match="host_memory_gb must be a positive number"):
        cluster_from_dict({**base, "machine": {**base["machine"], "host_memory_gb": -2}})
    with pytest.raises(ValueError, match="alpha must be in \\(0, 1\\]"):
        model_from_dict({"dense_params": 1, "sparse_params": 1, "moe_layers": 1, "alpha": 2})
    with pytest.raises(ValueError, match="missing 'moe_layers'"):
        model_from_dict({"dense_params": 1, "sparse_params": 1, "alpha": 0.5})


def test_cpu_knobs():
    k = cpu_knobs(ModelSpec("m", 0, 2**20 * 100, 4, 0.5), ranks=2)
    assert k.working_set_mb == pytest.approx(4 * 0.5 * 50) and k.host_cache_mb == pytest.approx(12 * 0.5 * 50)
    assert k.ssd_mb == pytest.approx(12 * 50) and k.resident_mb == pytest.approx(16 * 50)


def test_plan_tool_prints_and_writes_json(tmp_path):
    out = tmp_path / "p.json"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "plan.py"), str(CLUSTERS / "gpt_moe_104b_8x8_a100.yaml"),
                          "--json", str(out)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "=== capacity plan: GPT-MoE 104B" in run.stdout and "ssd" in run.stdout
    data = json.loads(out.read_text())
    assert data["fits"] and [t["tier"] for t in data["tiers"]] == ["device", "host", "ssd"]
    # one machine cannot hold 104B parameters' states: exit status 1 and the verdict
    one = tmp_path / "one.yaml"
    one.write_text((CLUSTERS / "gpt_moe_104b_8x8_a100.yaml").read_text().replace("machines: 8", "machines: 1"))
    run = subprocess.run([sys.executable, str(REPO / "tools" / "plan.py"), str(one), "--alpha", "1.0"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 1 and "DOES NOT FIT: host" in run.stdout, run.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmachines: 1\nmachine: {devices: 1}\n")
    run = subprocess.run([sys.executable, str(REPO / "tools" / "plan.py"), str(bad)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and "missing 'device_memory_gb'" in run.stderr
