"""The training config schema: every malformed config fails with one line naming the key."""

from pathlib import Path

import pytest

from paddle_semoe.config import ConfigError, load_config
from paddle_semoe.engine.config import ParallelConfig, TrainConfig
from paddle_semoe.engine.plan import count_parameters, format_plan

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "gpt_moe_tiny.yaml"


def test_tiny_config_loads_and_overrides_apply():
    cfg = load_config(TrainConfig, TINY, ["model.moe.top_k=1", "train.max_steps=7"])
    assert cfg.model.moe.top_k == 1 and cfg.train.max_steps == 7
    assert cfg.parallel.ep_degree == 2


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["trian.max_steps=3"], "trian", "did you mean 'train'"),
        (["model.moe.topk=2"], "model.moe.topk", "did you mean 'model.moe.top_k'"),
        (["train.max_steps=ten"], "train.max_steps", "int"),
        (["train.max_steps=true"], "train.max_steps", "int"),
        (["model.moe.gate=expert"], "model.moe", "gate must be one of"),
        (["model.moe.top_k=9"], "model.moe", "top_k must be in [1, num_experts=8], got 9"),
        (["parallel.sharding_stage=4"], "parallel", "sharding_stage must be 1, 2 or 3"),
        (["optim.schedule=cosinus"], "optim", "schedule must be one of"),
        (["data.seq_len=512"], "", "exceeds model.max_seq_len"),
        (["parallel.ep_degree=3"], "", "divisible by parallel.ep_degree=3"),
        (["model.n_heads=5"], "model", "divisible by n_heads=5"),
        (["optim.lr=-1.0"], "optim", "lr must be positive"),
        (["parallel.a2a_backend=mpi"], "parallel", "a2a_backend must be one of"),
        (["amp.dtype=float8"], "amp", "dtype must be one of"),
        (["model.moe.capacity_factor=0.0"], "model.moe", "must be > 0 unless dropless"),
        (["monitor.visualdl=maybe"], "monitor.visualdl", "bool"),
    ],
)
def test_malformed_config_names_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, TINY, overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert fragment in msg, msg
    if key:
        assert f"'{key}" in msg or f"{key}:" in msg or key in msg, msg


def test_missing_base_file_names_it(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(TrainConfig, cfg)


def test_degrees_must_multiply_to_the_world_size():
    with pytest.raises(ValueError, match="do not multiply to the world size: dp_degree=3 x sharding_degree=1 = 3, but 2"):
        ParallelConfig(dp_degree=3).resolve(2)
    with pytest.raises(ValueError, match="ep_degree=4 must divide the world size 6"):
        ParallelConfig(ep_degree=4).resolve(6)
    assert ParallelConfig(sharding_degree=2).resolve(4).dp_degree == 2


@pytest.mark.parametrize("name", ["gpt_1p3b_e8", "gpt_1p3b_e16", "gpt_1p3b_e64", "gpt_1p3b_e64_2node"])
def test_gpu_configs_plan_without_allocating(name):
    cfg = load_config(TrainConfig, REPO / "configs" / "gpu" / f"{name}.yaml")
    world = cfg.parallel.dp_degree * cfg.parallel.sharding_degree
    text = format_plan(cfg, world)
    assert "per rank" in text
    counts = count_parameters(cfg, cfg.parallel.ep_degree)
    assert counts.dense > 700e6  # lazily built: no 1e9-element tensors were allocated in this test
    assert counts.expert_total == counts.expert_per_rank * cfg.parallel.ep_degree
