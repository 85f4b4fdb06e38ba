"""Mixed precision on GPU: autocast contexts, O2 decoration and a dynamic loss scaler.

bfloat16 needs no loss scaling; float16 uses :class:`LossScaler`: the loss is multiplied by
the scale before ``backward``, gradients are divided by it after the (fused) reduction, and
a step whose gradients overflow is skipped while the scale halves; after
``growth_interval`` clean steps it doubles. The scaler is a plain object whose state goes into
checkpoints, so a resumed run continues with the same scale.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import paddle

from paddle_semoe.engine.config import AmpConfig


@dataclass
class LossScaler:
    scale: float = 2.0**15
    growth_interval: int = 1000
    factor: float = 2.0
    min_scale: float = 1.0
    clean_steps: int = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale = max(self.scale / self.factor, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.factor
            self.clean_steps = 0

    @property
    def at_minimum(self) -> bool:
        return self.scale <= self.min_scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])


def autocast(cfg: AmpConfig):
    """The forward-pass context for ``cfg`` (a no-op when AMP is off)."""
    if not cfg.enabled:
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(enable=True, level=cfg.level, dtype=cfg.dtype)


def scaler_for(cfg: AmpConfig) -> LossScaler | None:
    return LossScaler() if cfg.enabled and cfg.dtype == "float16" else None


@paddle.no_grad()
def unscale_(params, scale: float) -> None:
    """Divide every gradient by the loss scale, in place."""
    inv = 1.0 / scale
    for p in params:
        if p.grad is not None:
            paddle.assign(p.grad * inv, output=p.grad)
