"""Task-routed dispatch: tokens go to their task's expert or to the shared expert, no gate
over experts and no all-to-all.

In an elastic plan (:mod:`paddle_semoe.elastic`) a rank hosts the experts of exactly the tasks whose samples it runs, so
every token's expert is local. The local expert list is ``[shared, hosted task 0, hosted
task 1, ...]`` (local expert 0 = shared, ``1 + j`` = the j-th hosted task). A token of task
``t`` whose learned choice is "task" goes to ``1 + j(t)``, otherwise to 0.

:func:`task_route` computes the expert-major permutation with a stable sort (tokens keep
their order inside an expert, so the result is deterministic), the per-expert row counts
(through the library's ``expert_count`` op) and every token's row; the MoE block then runs
``ops.grouped_ffn`` over the rows and ``ops.combine`` back with the straight-through weights.
"""

from __future__ import annotations

from dataclasses import dataclass
import paddle

from paddle_semoe import ops

__all__ = ["TaskRoute", "local_expert_ids", "task_route"]


@dataclass(frozen=True)
class TaskRoute:
    """Where each token goes.

    Attributes:
        order: int64 [T]: ``rows = x[order]`` is expert-major.
        positions: int32 [T, 1]: row of token t in ``rows`` (``ops.combine`` layout).
        counts: int32 [E_local]: rows per local expert.
    """

    order: paddle.Tensor
    positions: paddle.Tensor
    counts: paddle.Tensor


def local_expert_ids(task_local_T: paddle.Tensor, use_task_T: paddle.Tensor) -> paddle.Tensor:
    """int32 [T]: ``1 + task_local`` where the token uses its task expert, else 0 (shared).

    ``task_local_T``: int32 [T], index of the token's task among the rank's hosted tasks;
    ``use_task_T``: bool [T], the hard choice.
    """
    return paddle.where(use_task_T, task_local_T + 1, paddle.zeros_like(task_local_T)).astype("int32")


def task_route(expert_T: paddle.Tensor, num_local_experts: int, backend: str | None = None) -> TaskRoute:
    """Stable expert-major routing of int32 ``expert_T`` (values in ``[0, E_local)``)."""
    if expert_T.dtype != paddle.int32 or len(expert_T.shape) != 1:
        raise ValueError(f"task_route: expert ids must be int32 [T], got {expert_T.dtype} {list(expert_T.shape)}")
    T = expert_T.shape[0]
    order = paddle.argsort(expert_T, stable=True).astype("int64")
    positions = paddle.zeros([T], dtype="int32")
    if T:
        positions = paddle.scatter(positions, order, paddle.arange(T, dtype="int32"))
    counts = ops.expert_count(expert_T, num_local_experts, backend=backend)
    for t in (order, positions, counts):
        t.stop_gradient = True
    return TaskRoute(order=order, positions=positions.reshape([T, 1]), counts=counts)

