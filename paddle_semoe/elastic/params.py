"""Which parameters belong to which task (the elastic sync and checkpoint unit).

A multi-task MoE model has *shared* parameters (the backbone, the shared expert) that every
rank holds, and *task* parameters (task ``t``'s expert in every MoE block, its gate, its head)
that only the ranks running task ``t`` hold. Layers tag task parameters at construction with
:func:`mark_task_params`; untagged parameters are shared. The tag is an attribute on the
parameter object (like :mod:`paddle_semoe.moe.params`), so it survives wrappers.
"""

from __future__ import annotations

from typing import Iterable

import paddle

__all__ = ["SHARED", "entity_name", "mark_task_params", "split_by_task", "task_of"]

#: The "task" of shared parameters.
SHARED: None = None
_ATTR = "semoe_task"


def mark_task_params(params: Iterable[paddle.Tensor], task: int) -> None:
    """Tag parameters as belonging to task index ``task`` (>= 0)."""
    if not isinstance(task, int) or isinstance(task, bool) or task < 0:
        raise ValueError(f"task must be a non-negative int, got {task!r}")
    for p in params:
        setattr(p, _ATTR, task)


def task_of(p: paddle.Tensor) -> int | None:
    """The task index of a parameter, or :data:`SHARED` (``None``)."""
    return getattr(p, _ATTR, SHARED)


def entity_name(task: int | None, task_names: tuple[str, ...] | list[str]) -> str:
    """``"shared"`` or ``"task:<name>"``: the unit of ownership in checkpoints and digests."""
    return "shared" if task is None else f"task:{task_names[task]}"


def split_by_task(named: Iterable[tuple[str, paddle.Tensor]]) -> dict[int | None, list[tuple[str, paddle.Tensor]]]:
    """Trainable ``(name, param)`` pairs grouped by task (``None`` = shared), order kept."""
    out: dict[int | None, list[tuple[str, paddle.Tensor]]] = {}
    for name, p in named:
        if not p.stop_gradient:
            out.setdefault(task_of(p), []).append((name, p))
    return out
