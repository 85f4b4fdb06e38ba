"""Parameter tags that communication, optimizers and checkpoints read (a neutral low module).

Two independent tags, each an attribute on the parameter object (so it survives wrappers such
as ``fleet.distributed_model`` that rename or re-nest sublayers):

* the **class** of an MoE parameter (SE-MoE section 3): ``dense`` (attention, embeddings,
  norms; replicated, gradients averaged over all ranks), ``gate`` (replicated, gradients also
  averaged over all ranks, through ``Topology.gate_group``) or ``expert`` (owned by one rank of
  the expert-parallel group, never averaged across it). Untagged parameters are dense.
* the **task** of a multi-task parameter (the elastic sync and checkpoint unit): task ``t``'s
  parameters exist only on the ranks running ``t``; untagged parameters are shared.

Layers tag their parameters at construction (:func:`mark_params`, :func:`mark_task_params`).
"""

from __future__ import annotations

from typing import Iterable, Literal

import paddle

__all__ = [
    "PARAM_CLASSES", "SHARED", "ParamClass", "classify_parameters", "entity_name", "mark_params", "mark_task_params",
    "param_class", "split_by_task", "task_of",
]

ParamClass = Literal["dense", "gate", "expert"]
PARAM_CLASSES: tuple[ParamClass, ...] = ("dense", "gate", "expert")
_CLASS_ATTR = "semoe_param_class"
#: The "task" of shared parameters.
SHARED: None = None
_TASK_ATTR = "semoe_task"


def mark_params(params: Iterable[paddle.Tensor], cls: ParamClass) -> None:
    """Tag parameters with their class (``"gate"`` or ``"expert"``; dense is the default)."""
    if cls not in PARAM_CLASSES:
        raise ValueError(f"parameter class must be one of {PARAM_CLASSES}, got {cls!r}")
    for p in params:
        setattr(p, _CLASS_ATTR, cls)


def param_class(p: paddle.Tensor) -> ParamClass:
    """The class of one parameter: ``"dense"`` unless tagged otherwise."""
    return getattr(p, _CLASS_ATTR, "dense")


def classify_parameters(layer: paddle.nn.Layer) -> dict[ParamClass, list[tuple[str, paddle.Tensor]]]:
    """Group a model's trainable parameters by class, keeping ``named_parameters`` order."""
    groups: dict[ParamClass, list[tuple[str, paddle.Tensor]]] = {c: [] for c in PARAM_CLASSES}
    for name, p in layer.named_parameters():
        if not p.stop_gradient:
            groups[param_class(p)].append((name, p))
    return groups


def mark_task_params(params: Iterable[paddle.Tensor], task: int) -> None:
    """Tag parameters as belonging to task index ``task`` (>= 0)."""
    if not isinstance(task, int) or isinstance(task, bool) or task < 0:
        raise ValueError(f"task must be a non-negative int, got {task!r}")
    for p in params:
        setattr(p, _TASK_ATTR, task)


def task_of(p: paddle.Tensor) -> int | None:
    """The task index of a parameter, or :data:`SHARED` (``None``)."""
    return getattr(p, _TASK_ATTR, SHARED)


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
