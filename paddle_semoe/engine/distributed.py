"""Process-group set-up of a training job: Fleet collective init and the MoE topology.

``python -m paddle.distributed.launch --nproc_per_node N [--nnodes M --master IP:PORT]
tools/train.py -c cfg.yaml`` starts N processes per machine; each calls
:func:`init_distributed`, which initializes Fleet with the configured data-parallel and
sharding degrees and builds the expert-parallel topology (EP, expert-DP, intra/inter node
groups) on top of it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import paddle
from paddle.distributed import fleet

from paddle_semoe.comm import Topology, gloo_private_rendezvous, topology_from_fleet
from paddle_semoe.engine.config import ParallelConfig, TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class DistContext:
    world_size: int
    rank: int
    parallel: ParallelConfig  # resolved (dp_degree filled in)
    topology: Topology
    hcg: Any = None  # Fleet's hybrid communicate group (None for a single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """World size from the launcher's environment (1 when started as a plain script)."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", os.environ.get("WORLD_SIZE", "1")))


def check_parallel_support(cfg: TrainConfig, world_size: int) -> ParallelConfig:
    """Resolve degrees against the world size and refuse what this build cannot run."""
    par = cfg.resolve_parallel(world_size)  # degrees and the batch split
    on_gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if par.sharding_stage > 1 and par.sharding_degree > 1 and not on_gpu:
        raise ValueError(
            f"parallel.sharding_stage={par.sharding_stage} needs GPUs (paddle.distributed.sharding."
            "group_sharded_parallel asserts a GPU); on CPU use parallel.sharding_stage=1 (ZeRO-1 "
            "through Fleet's sharding optimizer)"
        )
    if par.a2a_backend in ("nccl", "nccl_fused") and not on_gpu:
        raise ValueError(
            f"parallel.a2a_backend={par.a2a_backend} needs GPUs with NCCL; on CPU use auto or gloo"
        )
    if cfg.amp.enabled and not on_gpu and cfg.amp.dtype == "float16":
        raise ValueError(
            "amp.dtype=float16 needs a GPU; on CPU use amp.dtype=bfloat16 (bf16 GEMMs, float32 weights) or amp.enabled=false"
        )
    if cfg.amp.enabled and not on_gpu and cfg.amp.level != "O1":
        raise ValueError(
            f"amp.level={cfg.amp.level} casts the parameters to bfloat16, which the CPU kernels refuse; "
            "on CPU use amp.level=O1 (bf16 GEMMs with float32 master weights)"
        )
    return par


def init_distributed(cfg: TrainConfig) -> DistContext:
    """Initialize Fleet (when launched with >1 process) and build the MoE topology."""
    world = launched_world_size()
    par = check_parallel_support(cfg, world)
    if world == 1:
        if par.ep_degree != 1:
            raise ValueError(f"parallel.ep_degree={par.ep_degree} needs {par.ep_degree}+ processes; 1 was launched")
        return DistContext(1, 0, par, Topology.single(), None)

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {
        "dp_degree": par.dp_degree,
        "mp_degree": 1,
        "pp_degree": 1,
        "sharding_degree": par.sharding_degree,
    }
    # Gloo groups otherwise rendezvous under shared keys and can connect to another group's
    # stale address (seen with dp x sharding on 4 processes); a no-op under NCCL.
    with gloo_private_rendezvous():
        fleet.init(is_collective=True, strategy=strategy)
    hcg = fleet.get_hybrid_communicate_group()
    topology = topology_from_fleet(par.ep_degree, hcg=hcg, ranks_per_node=par.ranks_per_node)
    rank = paddle.distributed.get_rank()
    logger.info("rank %d/%d: %s", rank, world, topology.describe())
    return DistContext(world, rank, par, topology, hcg)
