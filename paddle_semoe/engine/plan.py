"""The job plan printed by ``tools/train.py --dry_run``: groups, parameter counts, memory.

The model is built under ``paddle.LazyGuard`` so that even a multi-billion-parameter GPU
config is planned on a laptop without allocating its weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import paddle

from paddle_semoe.comm.topology import CommGroup, group_rank_lists
from paddle_semoe.config import load_config
from paddle_semoe.engine.config import TrainConfig
from paddle_semoe.models.gpt import ExpertParallel, GPTMoE
from paddle_semoe.params import classify_parameters
from paddle_semoe.storage.capacity import ModelSpec

BYTES_PER_PARAM_TRAINING = 16  # fp32 weight + grad + two AdamW moments


class _PlanningExchange:
    """Stands in for the expert exchange while the model is only built, never run."""

    def __init__(self, ep_degree: int, num_local_experts: int):
        self.ep_degree = ep_degree
        self.num_local_experts = num_local_experts

    def dispatch(self, rows: paddle.Tensor, counts: paddle.Tensor, /) -> tuple[paddle.Tensor, paddle.Tensor, None]:
        raise RuntimeError("a planning model cannot run")

    def combine(self, rows: paddle.Tensor, plan: None, /) -> paddle.Tensor:
        raise RuntimeError("a planning model cannot run")


def planning_parallel(cfg: TrainConfig, ep_degree: int) -> ExpertParallel | None:
    """The expert-parallel context of rank 0 for a model that is built but never run."""
    if ep_degree == 1:
        return None
    group = CommGroup("ep", tuple(range(ep_degree)), 0)
    return ExpertParallel(group, _PlanningExchange(ep_degree, cfg.model.moe.num_experts // ep_degree))


@dataclass(frozen=True)
class ParamCounts:
    dense: int  # attention, embeddings, norms, dense FFNs (replicated on every rank)
    gate: int  # routers (replicated)
    expert_per_rank: int  # this rank's experts
    expert_total: int  # all experts of the model


def count_parameters(cfg: TrainConfig, ep_degree: int) -> ParamCounts:
    """Parameter counts by class, from a lazily built model (no weights allocated)."""
    with paddle.LazyGuard():
        model = GPTMoE(cfg.model, planning_parallel(cfg, ep_degree))
    groups = classify_parameters(model)
    n = {k: sum(math.prod(p.shape) for _, p in v) for k, v in groups.items()}
    return ParamCounts(n["dense"], n["gate"], n["expert"], n["expert"] * ep_degree)


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _gib(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB"


def format_plan(cfg: TrainConfig, world_size: int, ranks_per_node: int | None = None) -> str:
    """The plan for ``world_size`` ranks; ``ValueError`` naming the problem when the config
    cannot run on that many."""
    par = cfg.resolve_parallel(world_size)
    rpn = ranks_per_node or par.ranks_per_node or world_size
    counts = count_parameters(cfg, par.ep_degree)
    lists = group_rank_lists(world_size, par.ep_degree, min(rpn, world_size), par.sharding_degree)
    replicated = counts.dense + counts.gate
    per_rank = replicated + counts.expert_per_rank
    total = replicated + counts.expert_total
    dense_state_share = replicated * (4 + 4) + replicated * 8 / (par.sharding_degree if par.sharding_stage >= 1 else 1)
    per_rank_bytes = dense_state_share + counts.expert_per_rank * BYTES_PER_PARAM_TRAINING
    m = cfg.model
    lines = [
        "=== paddle-semoe plan ===",
        f"model: GPT-MoE d_model={m.d_model} layers={m.n_layers} heads={m.n_heads} d_ff={m.d_ff} "
        f"vocab={m.vocab_size} seq={m.max_seq_len}; MoE every {m.moe_every} -> layers {m.moe_layers}, "
        f"{m.moe.num_experts} experts, gate={m.moe.gate}, top_k={m.moe.top_k}, "
        f"{'dropless' if m.moe.dropless else f'capacity_factor={m.moe.capacity_factor}'}",
        f"world={world_size}: dp_degree={par.dp_degree} sharding_degree={par.sharding_degree} "
        f"(stage {par.sharding_stage}) ep_degree={par.ep_degree} expert_dp={world_size // par.ep_degree} "
        f"ranks_per_node={min(rpn, world_size)} hierarchical_a2a={par.hierarchical_a2a}",
        f"groups: ep={lists['ep']} expert_dp={lists['expert_dp']}",
        f"        intra_node={lists['intra_node']} inter_node={lists['inter_node']} sharding={lists['sharding']}",
        f"parameters: total {_fmt(total)} = dense {_fmt(counts.dense)} + gate {_fmt(counts.gate)} + "
        f"experts {_fmt(counts.expert_total)}",
        f"per rank:   {_fmt(per_rank)} = replicated {_fmt(replicated)} + experts {_fmt(counts.expert_per_rank)} "
        f"({counts.expert_total // max(counts.expert_per_rank, 1) if counts.expert_per_rank else 0}-way expert split)",
        f"memory per rank (fp32 weights+grads+AdamW, ZeRO-1 over {par.sharding_degree}): {_gib(per_rank_bytes)} "
        "+ activations",
        f"batch: {cfg.data.global_batch_size} sequences x {cfg.data.seq_len} tokens per step, "
        f"{cfg.optim.grad_accum_steps} micro-step(s); {cfg.train.max_steps} steps",
    ]
    return "\n".join(lines)


def model_spec_from_train_config(
    path: Path, alpha: float | None = None, name: str | None = None, overrides: Sequence[str] = ()
) -> ModelSpec:
    """D, S and L of a training config's model for the capacity model (``tools/plan.py``);
    ``alpha`` defaults to ``k / num_experts`` (k after the gate's rule)."""
    cfg = load_config(TrainConfig, path, list(overrides))
    counts = count_parameters(cfg, 1)
    m = cfg.model
    return ModelSpec(
        name or Path(path).stem,
        float(counts.dense + counts.gate),
        float(counts.expert_total),
        max(len(m.moe_layers), 1),
        float(alpha) if alpha is not None else min(m.moe.k / m.moe.num_experts, 1.0),
    )
