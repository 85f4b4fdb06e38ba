"""Parameter classes of an MoE model (SE-MoE section 3): dense, gate, expert.

Dense parameters (attention, embeddings, norms) are replicated and reduced over the
data-parallel group; gate parameters are replicated and reduced over the expert-parallel
group; expert parameters are owned by one rank of the expert-parallel group and never
averaged across it. Layers tag their parameters at construction; everything untagged is
dense. The tag is an attribute on the parameter object, so it survives wrappers
(``fleet.distributed_model``) that rename or re-nest sublayers.
"""

from __future__ import annotations

from typing import Iterable, Literal

import paddle

ParamClass = Literal["dense", "gate", "expert"]
PARAM_CLASSES: tuple[ParamClass, ...] = ("dense", "gate", "expert")
_ATTR = "semoe_param_class"


def mark_params(params: Iterable[paddle.Tensor], cls: ParamClass) -> None:
    """Tag parameters with their class (``"gate"`` or ``"expert"``; dense is the default)."""
    if cls not in PARAM_CLASSES:
        raise ValueError(f"parameter class must be one of {PARAM_CLASSES}, got {cls!r}")
    for p in params:
        setattr(p, _ATTR, cls)


def param_class(p: paddle.Tensor) -> ParamClass:
    """The class of one parameter: ``"dense"`` unless tagged otherwise."""
    return getattr(p, _ATTR, "dense")


def classify_parameters(layer: paddle.nn.Layer) -> dict[ParamClass, list[tuple[str, paddle.Tensor]]]:
    """Group a model's trainable parameters by class, keeping ``named_parameters`` order."""
    groups: dict[ParamClass, list[tuple[str, paddle.Tensor]]] = {c: [] for c in PARAM_CLASSES}
    for name, p in layer.named_parameters():
        if not p.stop_gradient:
            groups[param_class(p)].append((name, p))
    return groups
