"""Worker: an expert-parallel MoELayer against the single-rank layer on the same global batch.

Every rank builds the same global problem (weights, inputs, upstream gradients) from a seed.
Reference (computed on every rank, no communication): one EP=1 layer holding all E experts is
applied to each rank's chunk of tokens; the objective is the mean over chunks of
``<y_r, G_r> + aux_r``. Expert-parallel: rank r runs the EP layer (its E/ep experts, the
Gloo exchange, flat or hierarchical) on chunk r, back-propagates its chunk loss and reduces
gradients with the fused per-class rule. The test compares outputs, losses and gradients.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import paddle
import paddle.distributed as dist

from paddle_semoe.comm import ExpertExchange, GradientReducer, build_topology, make_communicator
from paddle_semoe.moe import MoEConfig, MoELayer

D, F, E, T = 16, 24, 8, 40


def problem(world: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    return {
        "router": rng.standard_normal((D, E)).astype("float32"),
        "w1": (0.3 * rng.standard_normal((E, D, F))).astype("float32"),
        "b1": (0.1 * rng.standard_normal((E, F))).astype("float32"),
        "w2": (0.3 * rng.standard_normal((E, F, D))).astype("float32"),
        "b2": (0.1 * rng.standard_normal((E, D))).astype("float32"),
        "x": rng.standard_normal((world * T, D)).astype("float32"),
        "g": rng.standard_normal((world * T, D)).astype("float32"),
    }


def set_weights(layer: MoELayer, prob: dict, lo: int, hi: int) -> None:
    layer.router.weight.set_value(prob["router"])
    for name in ("w1", "b1", "w2", "b2"):
        getattr(layer.experts, name).set_value(prob[name][lo:hi])
    if layer.shared_experts is not None:  # one shared expert of width F: expert 0's weights
        for name in ("w1", "b1", "w2", "b2"):
            getattr(layer.shared_experts, name).set_value(prob[name][0])
    if hasattr(layer.router, "balance_bias"):  # aux-free: a fixed bias that changes selection
        layer.router.balance_bias.set_value(np.linspace(-0.2, 0.2, E).astype("float32"))


def chunk_loss(layer: MoELayer, x: np.ndarray, g: np.ndarray, seed: int):
    paddle.seed(seed)  # same gate noise for chunk r on the reference and on rank r
    out = layer(paddle.to_tensor(x))
    return out, (out.y * paddle.to_tensor(g)).mean() + out.aux_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ep", type=int, required=True)
    ap.add_argument("--rpn", type=int, required=True)
    ap.add_argument("--hierarchical", action="store_true")
    ap.add_argument("--gate", default="topk")
    ap.add_argument("--cf", type=float, default=1.0)
    ap.add_argument("--router", default="token_choice")
    ap.add_argument("--shared", type=int, default=0, help="shared experts (0 or 1)")
    args = ap.parse_args()
    dist.init_parallel_env()
    world, rank = dist.get_world_size(), dist.get_rank()
    topo = build_topology(args.ep, ranks_per_node=args.rpn)
    prob = problem(world)
    routing = dict(device_groups=4, device_limit=2) if args.router == "device_limited" else {}
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, gate=args.gate, top_k=2, capacity_factor=args.cf,
                    dropless=args.cf <= 0, aux_loss_coef=0.1, z_loss_coef=0.01, ops_backend="custom",
                    router=args.router, num_shared_experts=args.shared, **routing)
    out: dict[str, np.ndarray] = {}

    # reference: all experts on one "rank", chunk by chunk
    ref = MoELayer(cfg)
    set_weights(ref, prob, 0, E)
    total = None
    for r in range(world):
        o, loss_r = chunk_loss(ref, prob["x"][r * T:(r + 1) * T], prob["g"][r * T:(r + 1) * T], seed=100 + r)
        if r == rank:
            out["ref_y"], out["ref_aux"], out["ref_loss"] = o.y.numpy(), o.aux_loss.numpy(), loss_r.numpy()
            out["ref_kept"] = o.stats.kept.numpy()
        total = loss_r if total is None else total + loss_r
    (total / world).backward()

    # expert parallel
    el = E // args.ep
    comm = make_communicator("gloo", rank=rank, timeout_s=120)
    exchange = ExpertExchange(topo, el, communicator=comm, hierarchical=args.hierarchical)
    layer = MoELayer(cfg, exchange=exchange)
    lo = topo.ep_rank * el
    set_weights(layer, prob, lo, lo + el)
    o, loss = chunk_loss(layer, prob["x"][rank * T:(rank + 1) * T], prob["g"][rank * T:(rank + 1) * T], seed=100 + rank)
    loss.backward()
    GradientReducer(layer.parameters(), topo, comm).reduce()
    out.update(y=o.y.numpy(), aux=o.aux_loss.numpy(), loss=loss.numpy(), kept=o.stats.kept.numpy(), dropped=o.stats.dropped_fraction.numpy())
    out["router_grad"], out["ref_router_grad"] = layer.router.weight.grad.numpy(), ref.router.weight.grad.numpy()
    for name in ("w1", "b1", "w2", "b2"):
        out[f"{name}_grad"] = getattr(layer.experts, name).grad.numpy()
        out[f"ref_{name}_grad"] = getattr(ref.experts, name).grad.numpy()[lo:lo + el]
        if layer.shared_experts is not None:
            out[f"shared_{name}_grad"] = getattr(layer.shared_experts, name).grad.numpy()
            out[f"ref_shared_{name}_grad"] = getattr(ref.shared_experts, name).grad.numpy()
    np.savez(args.out / f"rank{rank}.npz", **out)


if __name__ == "__main__":
    main()
