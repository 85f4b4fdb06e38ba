"""Worker: the hidden-partitioned embedding against a full-table lookup (outputs and gradients)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import paddle
import paddle.distributed as dist

from paddle_semoe.comm import build_topology, make_communicator
from paddle_semoe.models.embedding import PartitionedEmbedding

V, D = 50, 12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dist.init_parallel_env()
    world, rank = dist.get_world_size(), dist.get_rank()
    topo = build_topology(world, ranks_per_node=world)
    comm = make_communicator("gloo", rank=rank, timeout_s=60)
    emb = PartitionedEmbedding(V, D, comm, topo.ep_group, init_std=1.0, seed=3)
    full = PartitionedEmbedding(V, D, None, __import__("paddle_semoe.comm.topology", fromlist=["CommGroup"]).CommGroup.solo("ep"), 1.0, seed=3)
    rng = np.random.default_rng(0)
    counts = [5 + 3 * r for r in range(world)]  # uneven token counts per rank
    ids = [rng.integers(0, V, size=(n,)) for n in counts]
    gs = [rng.standard_normal((n, D)).astype("float32") for n in counts]
    y = emb(paddle.to_tensor(ids[rank].reshape(1, -1)))
    (y.reshape([-1, D]) * paddle.to_tensor(gs[rank])).sum().backward()
    # reference: the whole table on this rank, every rank's tokens, summed objective
    ref_y = None
    total = None
    for r in range(world):
        yr = full(paddle.to_tensor(ids[r]))
        lr = (yr * paddle.to_tensor(gs[r])).sum()
        total = lr if total is None else total + lr
        if r == rank:
            ref_y = yr.numpy()
    total.backward()
    d = D // world
    np.savez(
        args.out / f"rank{rank}.npz",
        y=y.numpy().reshape(-1, D), ref_y=ref_y, grad=emb.weight.grad.numpy(),
        ref_grad=full.weight.grad.numpy()[:, rank * d:(rank + 1) * d], local_shape=np.array(emb.weight.shape),
    )


if __name__ == "__main__":
    main()
