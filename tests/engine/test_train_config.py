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
        # the layer widths come from the model: the shared MoE section has no d_model
        (["model.moe.d_model=64"], "model.moe.d_model", "unknown config key 'model.moe.d_model'"),
        (["model.moe.d_ff=0"], "model.moe", "d_ff must be positive, got 0"),
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


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.partition_embedding=true", "parallel.ep_degree=8", "model.d_model=100"],
         "model.partition_embedding=true splits model.d_model=100 over parallel.ep_degree=8: d_model must be divisible"),
        (["parallel.sharding_degree=2", "parallel.sharding_stage=2"],
         "sharding_stage 2/3 shards every parameter over the sharding group, but expert parameters are owned per rank"),
        (["parallel.dp_degree=3"], "ep_degree=2 must divide the world size dp_degree x sharding_degree = 3 x 1"),
        (["data.global_batch_size=34", "optim.grad_accum_steps=2"],
         "global_batch_size=34 cannot be split evenly over any world these degrees allow: it must be a multiple of 2 ranks"),
        (["storage.enabled=true"], "storage.enabled=true needs optim.expert_update=lazy"),
        (["storage.enabled=true", "optim.expert_update=lazy", "model.moe_every=0"], "needs an MoE model"),
        (["storage.enabled=true", "optim.expert_update=lazy", "amp.enabled=true"], "does not support amp.enabled=true"),
        (["storage.shard_dense=true", "parallel.sharding_degree=2", "parallel.sharding_stage=2", "model.moe_every=0"],
         "storage.shard_dense=true shards the dense parameters itself"),
    ],
)
def test_combinations_that_cannot_work_are_refused_in_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, TINY, overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert fragment in msg, msg


def test_partitioned_embedding_works_with_every_exchange_backend():
    """The embedding gets the communicator explicitly (not the fused exchange's NCCL handle),
    so no backend is refused with it."""
    for backend in ("auto", "gloo", "nccl", "nccl_fused"):
        cfg = load_config(TrainConfig, TINY, ["model.partition_embedding=true", f"parallel.a2a_backend={backend}"])
        assert cfg.model.partition_embedding and cfg.parallel.a2a_backend == backend


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
