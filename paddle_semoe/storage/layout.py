"""Byte layout of one expert's state: the unit every storage tier moves.

One expert of a :class:`~paddle_semoe.moe.experts.GroupedExperts` layer has four tensors
``w1 [D, F]``, ``b1 [F]``, ``w2 [F, D]``, ``b2 [D]`` (``n = 2DF + F + D`` floats). Its state is
three float32 sections of ``n`` floats each, back to back::

    [ master weights w1|b1|w2|b2 ][ first moments (same order) ][ second moments (same order) ]

padded to a multiple of 4096 bytes (the O_DIRECT block). A host-cache slot holds exactly
this payload; an SSD file holds a 4096-byte header followed by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

BLOCK = 4096
PARAM_NAMES: tuple[str, ...] = ("w1", "b1", "w2", "b2")
SECTIONS: tuple[str, ...] = ("master", "m", "v")


@dataclass(frozen=True)
class ExpertStateLayout:
    """Shapes and offsets of one expert's state (d_model ``D``, expert hidden ``F``)."""

    d_model: int
    d_ff: int

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.d_ff <= 0:
            raise ValueError(f"d_model and d_ff must be positive, got {self.d_model}, {self.d_ff}")

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        D, F = self.d_model, self.d_ff
        return {"w1": (D, F), "b1": (F,), "w2": (F, D), "b2": (D,)}

    @cached_property
    def numel(self) -> int:
        """Floats of one section (all four tensors)."""
        return sum(int(np.prod(s)) for s in self.shapes.values())

    @property
    def weight_bytes(self) -> int:
        """Bytes of the compute copy (fp32 weights) of one expert."""
        return 4 * self.numel

    @property
    def state_bytes(self) -> int:
        """Bytes of the three sections, unpadded."""
        return 12 * self.numel

    @property
    def slot_bytes(self) -> int:
        """Bytes of one padded payload (host slot / SSD payload)."""
        return -(-self.state_bytes // BLOCK) * BLOCK

    @cached_property
    def _spans(self) -> tuple[tuple[str, int, int, tuple[int, ...]], ...]:
        """(name, start, stop, shape) of each tensor inside a section."""
        out, o = [], 0
        for name in PARAM_NAMES:
            shape = self.shapes[name]
            n = int(np.prod(shape))
            out.append((name, o, o + n, shape))
            o += n
        return tuple(out)

    def views(self, slot: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """``views(slot)[section][tensor]``: shaped float32 views into a slot.

        Args:
            slot: float32 array of at least ``3 * numel`` elements (a cache slot or a buffer).
        """
        if slot.dtype != np.float32 or slot.size < 3 * self.numel:
            raise ValueError(f"slot must be float32 with >= {3 * self.numel} elements, got {slot.dtype} x {slot.size}")
        n = self.numel
        out: dict[str, dict[str, np.ndarray]] = {}
        for si, section in enumerate(SECTIONS):
            base = slot[si * n : (si + 1) * n]
            out[section] = {name: base[a:b].reshape(shape) for name, a, b, shape in self._spans}
        return out
