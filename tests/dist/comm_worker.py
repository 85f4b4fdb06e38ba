"""Worker of the multi-process comm tests (run by tests/dist/launch.py through paddle's launcher).

Cases (``--case``):

``exchange``
    For each topology of the world size (2 procs: ep=2 with 1 or 2 ranks per node; 4 procs:
    ep=4 as 2 nodes x 2, and ep=2 x expert_dp=2), each Gloo variant, flat and hierarchical,
    and each count pattern (``--fleet``: the first topology comes from Fleet, initialized
    inside ``gloo_private_rendezvous``): dispatch self-describing payload rows and combine
    ``2 * local + ep_rank`` back. Then the toy MoE step with fused and with per-parameter
    gradient reduction, clipping and one SGD step. Arrays go to ``<out>/rank<R>.npz``.
``fail_exit``
    Rank 1 joins the count phase, then exits (status 0) before the row exchange.
``fail_hang``
    Rank 1 joins the count phase, then sleeps; rank 0's watchdog (``--timeout``) must end it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import paddle.distributed as dist

from paddle_semoe.comm import (
    ExpertExchange,
    GradientReducer,
    Topology,
    build_topology,
    clip_grad_norm_,
    make_communicator,
    reduce_gradients_unfused,
    topology_from_fleet,
)
from paddle_semoe.comm.gloo_groups import gloo_private_rendezvous
from tests.comm.reference import make_payload
from tests.dist.comm_cases import COUNT_MODES, build_params, case_counts, make_problem, rank_loss

WIDTH = 5
PAD = 2
EL = 2
logger = logging.getLogger("comm_worker")


def topologies(world: int, use_fleet: bool) -> list[tuple[str, Topology]]:
    """(name, topology) pairs; every rank creates the same groups in the same order.

    With ``use_fleet`` the first topology comes from Fleet (2 processes: dp=2; 4 processes:
    dp=2 x sharding=2, whose overlapping groups need the private Gloo rendezvous).
    """
    if world == 2:
        first = topology_from_fleet(2, ranks_per_node=2) if use_fleet else build_topology(2, ranks_per_node=2)
        return [("ep2_rpn2", first), ("ep2_rpn1", build_topology(2, ranks_per_node=1))]
    if world == 4:
        first = topology_from_fleet(4, ranks_per_node=2) if use_fleet else build_topology(4, ranks_per_node=2)
        return [("ep4_rpn2", first), ("ep2x2_rpn2", build_topology(2, ranks_per_node=2))]
    raise SystemExit(f"unsupported world size {world}")


def run_exchange(name: str, topo: Topology, out: dict[str, np.ndarray]) -> None:
    P = topo.ep_degree
    for backend in ("gloo_pairwise", "gloo_allgather"):
        comm = make_communicator(backend, rank=topo.rank, timeout_s=60)
        for hier in (False, True):
            ex = ExpertExchange(topo, EL, communicator=comm, hierarchical=hier)
            for i, mode in enumerate(COUNT_MODES):
                counts = case_counts(P, EL, seed=100 + i, mode=mode)[topo.ep_rank]
                rows = paddle.to_tensor(make_payload(topo.rank, counts, WIDTH, padding=PAD))
                local, local_counts, plan = ex.dispatch(rows, paddle.to_tensor(counts))
                back = ex.combine(local * 2.0 + float(topo.ep_rank), plan)
                key = f"{name}.{backend}.hier{int(hier)}.{mode}"
                out[f"{key}.local"] = local.numpy()
                out[f"{key}.local_counts"] = local_counts.numpy()
                out[f"{key}.back"] = back.numpy()


def run_training_step(name: str, topo: Topology, out: dict[str, np.ndarray]) -> None:
    problem = make_problem(topo.world_size, topo.ep_degree, EL, seed=topo.world_size * 10 + topo.ep_degree)
    comm = make_communicator("gloo", rank=topo.rank, timeout_s=60)
    for fused in (True, False):
        A, g, experts = build_params(problem, topo.ep_rank)
        params = [A, g] + experts
        ex = ExpertExchange(topo, EL, communicator=comm, hierarchical=True)
        rank_loss(problem, topo.rank, ex, A, g, experts).backward()
        if fused:
            GradientReducer(params, topo, comm, bucket_bytes=48).reduce()
        else:
            reduce_gradients_unfused(params, topo, comm)
        key = f"{name}.step.{'fused' if fused else 'unfused'}"
        out[f"{key}.A_grad"] = A.grad.numpy()
        out[f"{key}.g_grad"] = g.grad.numpy()
        out[f"{key}.expert_grad"] = np.stack([w.grad.numpy() for w in experts])
        out[f"{key}.norm"] = np.array(clip_grad_norm_(params, 0.05, topo, comm))
        paddle.optimizer.SGD(learning_rate=0.5, parameters=params).step()
        out[f"{key}.A"] = A.numpy()
        out[f"{key}.g"] = g.numpy()
        out[f"{key}.experts"] = np.stack([w.numpy() for w in experts])
    out[f"{name}.ep_rank"] = np.array(topo.ep_rank)


def run_failure(case: str, timeout_s: float) -> None:
    topo = build_topology(2, ranks_per_node=2)
    ex = ExpertExchange(topo, 1, backend="gloo", timeout_s=timeout_s)
    counts = np.array([3, 2], np.int32)
    rows = paddle.ones([5, 4])
    plan = ex.exchange_counts(paddle.to_tensor(counts))
    if topo.rank == 1:
        if case == "fail_exit":
            logger.info("rank 1: exiting before the row exchange")
            os._exit(0)
        logger.info("rank 1: hanging before the row exchange")
        time.sleep(120)
        os._exit(0)
    logger.info("rank 0: entering the row exchange")
    ex.dispatch_rows(rows, plan)
    logger.error("rank 0: row exchange returned although the peer is gone")
    sys.exit(3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--case", choices=("exchange", "fail_exit", "fail_hang"), required=True)
    parser.add_argument("--fleet", action="store_true", help="initialize Fleet and build the first topology from it")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    if args.fleet:
        from paddle.distributed import fleet

        world = int(os.environ["PADDLE_TRAINERS_NUM"])
        sharding = 2 if world == 4 else 1
        strategy = fleet.DistributedStrategy()
        strategy.hybrid_configs = {"dp_degree": world // sharding, "mp_degree": 1, "pp_degree": 1, "sharding_degree": sharding}
        with gloo_private_rendezvous():
            fleet.init(is_collective=True, strategy=strategy)
    else:
        dist.init_parallel_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.monotonic()
    if args.case != "exchange":
        run_failure(args.case, args.timeout)
        return
    out: dict[str, np.ndarray] = {}
    for name, topo in topologies(world, args.fleet):
        out[f"{name}.sharding_ranks"] = np.array(topo.sharding_group.ranks if topo.sharding_group else [-1])
        out[f"{name}.dp_ranks"] = np.array(topo.dp_group.ranks)
        run_exchange(name, topo, out)
        run_training_step(name, topo, out)
    out["elapsed_s"] = np.array(time.monotonic() - t0)
    np.savez(args.out / f"rank{rank}.npz", **out)
    logger.info("rank %d done in %.2fs", rank, time.monotonic() - t0)


if __name__ == "__main__":
    main()
