"""A tiny UFO model + synthetic data shared by the elastic tests (no processes)."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F

from paddle_semoe.elastic.planner import Plan, TaskLoad
from paddle_semoe.elastic.sync import sample_weight
from paddle_semoe.models.ufo import TaskHead, UFOConfig, UFOModel, init_by_name

CFG = UFOConfig(image_size=8, patch_size=4, d_model=16, n_layers=2, n_heads=2, d_ff=24, moe_every=1)
HEADS = [TaskHead("digit", 10), TaskHead("parity", 2), TaskHead("ge5", 2), TaskHead("rotation", 4)]
BATCH = [8, 4, 2, 2]
WEIGHTS = [1.0, 0.5, 1.0, 2.0]
LOADS = [TaskLoad(h.name, b, 1.0) for h, b in zip(HEADS, BATCH)]
SEED = 7


def build(hosted) -> UFOModel:
    m = UFOModel(CFG, HEADS, list(hosted))
    init_by_name(m, SEED, 0.2)  # larger than default so the routing choices differ per token
    return m


def task_data(task: int) -> tuple[np.ndarray, np.ndarray]:
    """The task's whole global batch (deterministic)."""
    rng = np.random.default_rng([11, task])
    x = rng.random((BATCH[task], 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, HEADS[task].num_classes, size=BATCH[task]).astype(np.int64)
    return x, y


def local_objective(model: UFOModel, plan: Plan, rank: int) -> paddle.Tensor | None:
    """The rank's part of the global objective (what the trainer computes)."""
    xs, tl, parts, off = [], [], [], 0
    for j, t in enumerate(model.hosted):
        s = plan.shard(t, rank)
        x, y = task_data(t)
        xs.append(x[s.start:s.start + s.count])
        tl.append(np.full(s.count, j, np.int32))
        parts.append((t, off, s.count, y[s.start:s.start + s.count]))
        off += s.count
    if not parts:
        return None
    out = model(paddle.to_tensor(np.concatenate(xs)), paddle.to_tensor(np.concatenate(tl)))
    total = None
    for t, o, n, y in parts:
        ce = F.cross_entropy(model.head(t, out.cls[o:o + n]), paddle.to_tensor(y), reduction="sum")
        term = ce * sample_weight(plan, t, WEIGHTS[t])
        total = term if total is None else total + term
    return total
