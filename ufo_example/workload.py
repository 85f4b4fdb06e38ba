"""The UFO workload for the elastic trainer: digits tasks + the UFO model."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from paddle_semoe.models.ufo import TaskHead, UFOModel, init_by_name
from ufo_example.config import UFOJobConfig
from ufo_example.data import DigitsTasks

__all__ = ["UFOWorkload"]


class UFOWorkload:
    """Implements :class:`paddle_semoe.elastic.trainer.Workload` for :class:`UFOJobConfig`."""

    def __init__(self, cfg: UFOJobConfig) -> None:
        self.cfg = cfg
        self.tasks = tuple(cfg.tasks)
        self.data = DigitsTasks(cfg.data, [t.kind for t in cfg.tasks], cfg.train.seed)
        self.heads = [TaskHead(t.name, self.data.num_classes(i)) for i, t in enumerate(cfg.tasks)]

    def build_model(self, hosted: Sequence[int]) -> UFOModel:
        model = UFOModel(self.cfg.model, self.heads, list(hosted))
        init_by_name(model, self.cfg.train.seed, self.cfg.model.init_std)
        return model

    def train_samples(self, task: int, step: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        return self.data.train_batch(task, step, self.tasks[task].batch_size, start, count)

    def eval_samples(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        return self.data.held_out(task)

    def flops_per_sample(self, task: int) -> float:
        return self.cfg.model.flops_per_sample(self.heads[task].num_classes)
