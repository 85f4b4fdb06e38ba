"""``tools/train.py --dry_run``: plans every config under configs/ without --world_size, for the
smallest world the config allows, including partition_embedding with EP > 1."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from paddle_semoe.comm import SimulatedWorld
from paddle_semoe.config import load_config
from paddle_semoe.engine.config import ParallelConfig, TrainConfig
from paddle_semoe.engine.plan import count_parameters, format_plan, planning_parallel
from paddle_semoe.models.embedding import PartitionedEmbedding
from paddle_semoe.models.gpt import ExpertParallel, GPTConfig, GPTMoE
from paddle_semoe.moe import MoESettings

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _train_tool():
    spec = importlib.util.spec_from_file_location("semoe_train_tool", REPO / "tools" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_cluster_config(path: Path) -> bool:
    """configs/clusters/*.yaml describe machines for tools/plan.py, not training jobs."""
    return "machines" in (yaml.safe_load(path.read_text()) or {})


def _train_configs() -> list[Path]:
    """Every training config under configs/, plus those the cluster configs point at."""
    out = []
    for path in CONFIGS:
        if _is_cluster_config(path):
            ref = (yaml.safe_load(path.read_text()).get("model") or {}).get("train_config")
            if ref:
                out.append((path.parent / ref).resolve())
        else:
            out.append(path)
    return sorted(set(out))


def test_every_config_is_a_train_or_a_cluster_config():
    assert CONFIGS, "no configs found"
    for path in CONFIGS:
        if not _is_cluster_config(path):
            load_config(TrainConfig, path)  # raises naming the key if it is neither


@pytest.mark.parametrize("path", _train_configs(), ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_dry_run_plans_every_config_for_its_smallest_world(path, capsys, monkeypatch):
    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _train_tool().main(["-c", str(path), "--dry_run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    cfg = load_config(TrainConfig, path)
    world = cfg.parallel.smallest_world_size()
    assert f"planning for world_size={world} (the smallest world the config allows" in out
    assert f"world={world}: " in out and "per rank:" in out


@pytest.mark.parametrize("backend", ["auto", "nccl_fused"])
def test_dry_run_with_partitioned_embedding_and_expert_parallelism(backend, capsys, monkeypatch):
    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    args = ["-c", str(REPO / "configs" / "gpt_moe_tiny.yaml"), "--dry_run", "-o", "model.partition_embedding=true",
            "-o", "parallel.ep_degree=4", "-o", f"parallel.a2a_backend={backend}"]
    assert _train_tool().main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "world=4: " in out and "ep_degree=4" in out
    cfg = load_config(TrainConfig, REPO / "configs" / "gpt_moe_tiny.yaml", ["model.partition_embedding=true"])
    # the embedding slice is owned per rank like an expert: V x D/4 per rank, V x D in all
    whole, split = count_parameters(cfg, 1), count_parameters(cfg, 4)
    V, D = cfg.model.vocab_size, cfg.model.d_model
    assert whole.expert_per_rank - split.expert_per_rank * 4 == 0
    assert split.expert_per_rank == (whole.expert_total - V * D) // 4 + V * D // 4


def test_dry_run_with_an_explicit_world_and_a_bad_one(capsys, monkeypatch):
    monkeypatch.delenv("PADDLE_TRAINERS_NUM", raising=False)
    tool = _train_tool()
    assert tool.main(["-c", str(REPO / "configs" / "gpt_moe_tiny.yaml"), "--dry_run", "--world_size", "8"]) == 0
    assert "planning for world_size=8 (--world_size)" in capsys.readouterr().out
    assert tool.main(["-c", str(REPO / "configs" / "gpt_moe_tiny.yaml"), "--dry_run", "--world_size", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: ep_degree=2 must divide the world size 3", err


def test_smallest_world_size():
    assert ParallelConfig().smallest_world_size() == 1
    assert ParallelConfig(ep_degree=4, sharding_degree=6).smallest_world_size() == 12
    assert ParallelConfig(ep_degree=2, ranks_per_node=8).smallest_world_size() == 8
    assert ParallelConfig(dp_degree=3, ep_degree=3, sharding_degree=2).smallest_world_size() == 6


def test_the_usage_text_names_configs_that_exist():
    doc = _train_tool().__doc__
    named = re.findall(r"configs/\S+\.yaml", doc)
    assert named, doc
    for rel in named:
        assert (REPO / rel).is_file(), f"tools/train.py usage names {rel}, which does not exist"


def test_the_model_gets_its_communicator_explicitly_not_from_the_exchange():
    """partition_embedding reads the EP group and communicator from ExpertParallel: with the
    fused NCCL exchange (whose ``comm`` is an integer handle) it still gets the Communicator."""
    world = SimulatedWorld(2)
    comm = world.communicator(1)
    topo = world.topology(1, ep_degree=2, ranks_per_node=2)

    class HandleExchange:  # like FusedNcclExchange: a `comm` attribute that is not a Communicator
        ep_degree, num_local_experts, comm = 2, 2, 12345

        def dispatch(self, rows, counts, /):
            raise AssertionError("not run")

        def combine(self, rows, plan, /):
            raise AssertionError("not run")

    cfg = GPTConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, moe_every=2,
                    moe=MoESettings(num_experts=4), partition_embedding=True)
    model = GPTMoE(cfg, ExpertParallel(topo.ep_group, HandleExchange(), comm))
    assert isinstance(model.tok_emb, PartitionedEmbedding)
    assert model.tok_emb.comm is comm and model.tok_emb.group == topo.ep_group
    assert model.tok_emb.weight.shape == [cfg.vocab_size, 8]
    with pytest.raises(ValueError, match="exchange spans ep_degree=2 ranks but the group ep\\[ranks 0\\] has 1"):
        ExpertParallel(world.topology(0, ep_degree=1, ranks_per_node=2).ep_group, HandleExchange(), comm)


def test_planning_parallel_builds_rank_zero_of_the_group():
    cfg = load_config(TrainConfig, REPO / "configs" / "gpt_moe_tiny.yaml", ["model.partition_embedding=true"])
    assert planning_parallel(cfg, 1) is None
    par = planning_parallel(cfg, 2)
    assert par is not None and par.size == 2 and par.group.rank_in_group == 0 and par.comm is None
    assert par.exchange.num_local_experts == cfg.model.moe.num_experts // 2
    assert "per rank" in format_plan(cfg, 2)
