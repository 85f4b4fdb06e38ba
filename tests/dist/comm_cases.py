"""Cases shared by the simulated tests (tests/comm) and the multi-process workers (tests/dist).

Count patterns (:func:`case_counts`) and a toy MoE step.

Per rank ``r``: tokens ``x_r [T, D]`` with fixed expert ids; ``h = (x_r @ A) * g`` (``A``
dense, ``g`` gate-class), rows sorted expert-major, dispatched, expert ``x`` computes
``rows @ W_x``, combined, unsorted, ``loss_r = mean(y ** 2)``. The objective is the mean of
``loss_r`` over ranks; :func:`reference_grads` computes its gradients in one process with
all experts, which is what the distributed step must reproduce after gradient reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle

from paddle_semoe.comm import ExpertExchange, Topology
from paddle_semoe.params import mark_params


#: Count patterns: uneven with empty experts; one rank sends nothing; nobody sends; all to EP rank 0.
COUNT_MODES = ("uneven", "rank0_sends_nothing", "nobody_sends", "only_to_rank0")


def case_counts(P: int, El: int, seed: int, mode: str, max_rows: int = 6) -> list[np.ndarray]:
    """int32 ``[E]`` counts of every EP rank for one pattern of :data:`COUNT_MODES`."""
    from tests.comm.reference import random_counts

    if mode not in COUNT_MODES:
        raise ValueError(f"mode must be one of {COUNT_MODES}, got {mode!r}")
    rng = np.random.default_rng(seed)
    counts = [random_counts(rng, P * El, max_rows) for _ in range(P)]
    if mode == "rank0_sends_nothing":
        counts[0][:] = 0
    elif mode == "nobody_sends":
        for c in counts:
            c[:] = 0
    elif mode == "only_to_rank0":
        for c in counts:
            c[El:] = 0
    return counts


@dataclass(frozen=True)
class Problem:
    world_size: int
    ep_degree: int
    num_local_experts: int
    A: np.ndarray  # [D, D]
    g: np.ndarray  # [D]
    experts: np.ndarray  # [E, D, D]
    xs: list  # W x [T, D]
    ids: list  # W x int64 [T]

    @property
    def num_experts(self) -> int:
        return self.ep_degree * self.num_local_experts


def make_problem(world_size: int, ep_degree: int, num_local_experts: int, D: int = 4, T: int = 9, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    E = ep_degree * num_local_experts
    ids = []
    for r in range(world_size):
        i = rng.integers(0, E, size=T)
        if r == 0:
            i[:] = i % max(1, E // 2)  # skewed: rank 0 never uses the upper half of the experts
        ids.append(i.astype(np.int64))
    return Problem(
        world_size,
        ep_degree,
        num_local_experts,
        A=(rng.standard_normal((D, D)) * 0.5).astype(np.float32),
        g=(1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32),
        experts=(rng.standard_normal((E, D, D)) * 0.5).astype(np.float32),
        xs=[rng.standard_normal((T, D)).astype(np.float32) for _ in range(world_size)],
        ids=ids,
    )


def build_params(problem: Problem, ep_rank: int) -> tuple[paddle.Tensor, paddle.Tensor, list[paddle.Tensor]]:
    """Dense ``A``, gate ``g`` and this EP rank's expert weights as tagged parameters."""
    def param(value: np.ndarray) -> paddle.Tensor:
        p = paddle.create_parameter(list(value.shape), "float32")
        p.set_value(value)
        return p

    A, g = param(problem.A), param(problem.g)
    mark_params([g], "gate")
    El = problem.num_local_experts
    experts = [param(problem.experts[ep_rank * El + e]) for e in range(El)]
    mark_params(experts, "expert")
    return A, g, experts


def rank_loss(
    problem: Problem, rank: int, exchange: ExpertExchange, A: paddle.Tensor, g: paddle.Tensor, experts: list[paddle.Tensor]
) -> paddle.Tensor:
    x = paddle.to_tensor(problem.xs[rank])
    ids = problem.ids[rank]
    order = np.argsort(ids, kind="stable")
    counts = np.bincount(ids, minlength=problem.num_experts).astype(np.int32)
    h = paddle.matmul(x, A) * g
    rows = paddle.gather(h, paddle.to_tensor(order), axis=0)
    local, local_counts, plan = exchange.dispatch(rows, paddle.to_tensor(counts))
    outs, off = [], 0
    for e, n in enumerate(plan.local_counts.tolist()):
        outs.append(paddle.matmul(local[off : off + n], experts[e]))
        off += n
    local_out = paddle.concat(outs, axis=0)
    back = exchange.combine(local_out, plan)
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)
    y = paddle.gather(back, paddle.to_tensor(inv), axis=0)
    return paddle.mean(y * y)


def reference_grads(problem: Problem) -> dict[str, np.ndarray]:
    """Gradients of ``mean_r loss_r`` in one process (all experts local)."""
    single = Topology.single()
    A = paddle.to_tensor(problem.A, stop_gradient=False)
    g = paddle.to_tensor(problem.g, stop_gradient=False)
    Ws = [paddle.to_tensor(w, stop_gradient=False) for w in problem.experts]
    ex = ExpertExchange(single, problem.num_experts, backend="gloo")
    total = None
    for r in range(problem.world_size):
        loss = rank_loss(problem, r, ex, A, g, Ws)
        total = loss if total is None else total + loss
    (total / problem.world_size).backward()
    return {
        "A": A.grad.numpy(),
        "g": g.grad.numpy(),
        "experts": np.stack([w.grad.numpy() if w.grad is not None else np.zeros_like(problem.experts[0]) for w in Ws]),
    }
