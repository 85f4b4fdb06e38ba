"""The job plan printed by ``tools/train.py --dry_run``: groups, parameter counts, memory.

The model is built under ``paddle.LazyGuard`` so that even a multi-billion-parameter GPU
config is planned on a laptop without allocating its weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import paddle

from paddle_semoe.comm.topology import group_rank_lists
from paddle_semoe.engine.config import TrainConfig
from paddle_semoe.models.gpt import GPTMoE
from paddle_semoe.moe.params import classify_parameters

BYTES_PER_PARAM_TRAINING = 16  # fp32 weight + grad + two AdamW moments


class _PlanningExchange:
    """Stands in for the expert exchange while the model is only built, never run."""

    def dispatch(self, rows, counts):  # pragma: no cover - never called
        raise RuntimeError("a planning model cannot run")

    def combine(self, rows, plan):  # pragma: no cover
        raise RuntimeError("a planning model cannot run")


@dataclass(frozen=True)
class ParamCounts:
    dense: int  # attention, embeddings, norms, dense FFNs (replicated on every rank)
    gate: int  # routers (replicated)
    expert_per_rank: int  # this rank's experts
    expert_total: int  # all experts of the model


def count_parameters(cfg: TrainConfig, ep_degree: int) -> ParamCounts:
    """Parameter counts by class, from a lazily built model (no weights allocated)."""
    with paddle.LazyGuard():
        exchange = _PlanningExchange() if ep_degree > 1 else None
        model = GPTMoE(cfg.model, moe_exchange=exchange, ep_size=ep_degree)
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
    par = cfg.parallel.resolve(world_size)
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
