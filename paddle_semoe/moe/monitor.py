"""Routing health as scalars for the metrics (VisualDL, ``metrics.jsonl``).

Host-side helpers: the trainer reads the routing statistics (:class:`~paddle_semoe.moe.layer.
RoutingStats`, summed over its micro-batches and ranks) once per log step and turns them into
flat ``name -> float`` scalars here, so every consumer names them the same way:

* ``load_max_over_mean/layer{L}``: the busiest expert's demand (choices before capacity) over
  the mean demand of layer L (1.0 = perfectly balanced, E = everything on one expert);
* ``dropped_choice{j}/layer{L}``: share of the (j+1)-th choices not computed (``choice0`` are
  first choices: under choice-major priority they drop only when an expert's first choices
  alone overflow it);
* ``balance_bias_absmean/layer{L}`` and ``balance_bias_range/layer{L}``: the aux-free
  routers' bias (mean |b| and max b - min b).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import paddle.nn as nn

from paddle_semoe.moe.routers import AuxFreeRouter

__all__ = ["balance_biases", "routing_scalars"]


def balance_biases(model: nn.Layer) -> list[np.ndarray]:
    """The ``balance_bias`` [E] of every aux-free router of ``model``, in layer order."""
    return [layer.balance_bias.numpy() for layer in model.sublayers(include_self=True) if isinstance(layer, AuxFreeRouter)]


def routing_scalars(
    layer_ids: Sequence[int],
    demand: Sequence[np.ndarray],
    dropped_by_choice: Sequence[np.ndarray] | None = None,
    biases: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """Flat scalars for the MoE layers ``layer_ids`` (block indices, one per MoE layer).

    Args:
        demand: per layer, [E] routing choices per expert (any numeric dtype).
        dropped_by_choice: per layer, [K] dropped share of each choice rank (or None).
        biases: per layer, the aux-free ``balance_bias`` [E] (None or empty: no aux-free router).
    """
    if len(demand) != len(layer_ids):
        raise ValueError(f"routing_scalars: {len(demand)} demand vectors for {len(layer_ids)} MoE layers")
    out: dict[str, float] = {}
    for lid, d in zip(layer_ids, demand):
        d = np.asarray(d, dtype=np.float64)
        mean = d.mean() if d.size else 0.0
        out[f"load_max_over_mean/layer{lid}"] = float(d.max() / mean) if mean > 0 else 0.0
    for lid, dc in zip(layer_ids, dropped_by_choice or []):
        for j, v in enumerate(np.asarray(dc, dtype=np.float64).reshape(-1)):
            out[f"dropped_choice{j}/layer{lid}"] = float(v)
    for lid, b in zip(layer_ids, biases or []):
        b = np.asarray(b, dtype=np.float64)
        out[f"balance_bias_absmean/layer{lid}"] = float(np.abs(b).mean())
        out[f"balance_bias_range/layer{lid}"] = float(b.max() - b.min())
    return out
