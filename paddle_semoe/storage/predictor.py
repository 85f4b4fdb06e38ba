"""Which experts will the next MoE layers use? Co-activation statistics over recent steps.

SE-MoE prefetches from routing that is already known, without extra traffic: tokens of one
task go to related experts layer after layer. Per pair of MoE layers ``l < l'``, decayed counts::

    n[l][e]            steps in which local expert e of layer l was active
    co[l, l'][e, f]    ... in which, in addition, local expert f of layer l' was active

and scores expert ``f`` of layer ``l'`` as ``max over active e of co[l, l'][e, f] / n[l][e]``
(an estimate of P(f active | e active)), so one routing decision predicts every later layer
(the prefetch can run several layers ahead). For the first MoE layer of the next step it does
the same across steps (layer 0 at step s -> layer 0 at step s + 1). Without history the
previous step's set is the prediction. Local information only: every rank predicts its own
experts.
"""

from __future__ import annotations

import numpy as np


class CoActivationPredictor:
    """Decayed co-activation counts between MoE layers (and consecutive steps).

    Args:
        num_layers: MoE layers L.
        num_local: local experts per layer.
        decay: factor applied to all counts at every observed step, in (0, 1].
    """

    def __init__(self, num_layers: int, num_local: int, decay: float = 0.9):
        if num_layers < 1 or num_local < 1:
            raise ValueError(f"num_layers and num_local must be >= 1, got {num_layers}, {num_local}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.L, self.E, self.decay = num_layers, num_local, decay
        self.n = np.zeros((num_layers, num_local))
        self.co = np.zeros((num_layers, num_layers, num_local, num_local))  # co[l, l'] for l < l'
        self.n_time = np.zeros(num_local)
        self.co_time = np.zeros((num_local, num_local))  # layer 0, step s -> step s + 1
        self.last: np.ndarray | None = None  # [L, E] bool, the previous step's activity

    def observe(self, active: np.ndarray) -> None:
        """Record one step's activity ``active`` [L, E] (bool)."""
        a = np.asarray(active, dtype=bool)
        if a.shape != (self.L, self.E):
            raise ValueError(f"active must be [{self.L}, {self.E}], got {list(a.shape)}")
        af = a.astype(np.float64)
        self.n = self.n * self.decay + af
        self.co *= self.decay
        for l in range(self.L):
            for l2 in range(l + 1, self.L):
                self.co[l, l2] += np.outer(af[l], af[l2])
        if self.last is not None:
            prev = self.last[0].astype(np.float64)
            self.n_time = self.n_time * self.decay + prev
            self.co_time = self.co_time * self.decay + np.outer(prev, af[0])
        self.last = a.copy()

    @staticmethod
    def _scores(n: np.ndarray, co: np.ndarray, given: np.ndarray) -> np.ndarray:
        rows = np.flatnonzero(given & (n > 0))
        if rows.size == 0:
            return np.zeros(co.shape[1])
        return (co[rows] / n[rows, None]).max(axis=0)

    def later_layer(self, layer: int, active: np.ndarray, target: int) -> np.ndarray:
        """Scores in [0, 1] for layer ``target``'s (> ``layer``) local experts given ``layer``'s
        activity; the previous step's set when there is no history."""
        if not layer < target < self.L:
            raise ValueError(f"target layer {target} must be in ({layer}, {self.L})")
        s = self._scores(self.n[layer], self.co[layer, target], np.asarray(active, dtype=bool))
        return s if s.any() or self.last is None else self.last[target].astype(np.float64)

    def first_layer(self) -> np.ndarray:
        """Scores for the first MoE layer of the next step, from this step's first layer."""
        if self.last is None:
            return np.zeros(self.E)
        s = self._scores(self.n_time, self.co_time, self.last[0])
        return s if s.any() else self.last[0].astype(np.float64)
