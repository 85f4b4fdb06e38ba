"""The UFO example's job config: ``python ufo_example/train.py -c CONFIG.yaml [-o key=value ...]``.

Sections: ``model`` (:class:`~paddle_semoe.models.ufo.UFOConfig`), ``data``
(:class:`~ufo_example.data.DataConfig`), ``tasks`` (list of
:class:`~paddle_semoe.elastic.config.TaskSpec`; ``kind`` is one of digit / parity / ge5 /
rotation), ``elastic``, ``optim`` (the engine's AdamW + schedule), ``train``, ``monitor``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from paddle_semoe.elastic.config import ElasticConfig, ElasticRunConfig, TaskSpec, check_tasks
from paddle_semoe.engine.config import MonitorConfig, OptimConfig
from paddle_semoe.models.ufo import UFOConfig
from ufo_example.data import DIGIT_TASK_KINDS, DataConfig

__all__ = ["UFOJobConfig"]


def _default_tasks() -> list[TaskSpec]:
    return [
        TaskSpec("digit", "digit", 64),
        TaskSpec("parity", "parity", 32),
        TaskSpec("ge5", "ge5", 16),
        TaskSpec("rotation", "rotation", 16),
    ]


@dataclass(frozen=True)
class UFOJobConfig:
    model: UFOConfig = field(default_factory=UFOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: list[TaskSpec] = field(default_factory=_default_tasks)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: ElasticRunConfig = field(default_factory=ElasticRunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        check_tasks(self.tasks, self.elastic.cost_source)
        for t in self.tasks:
            if t.kind not in DIGIT_TASK_KINDS:
                raise ValueError(f"tasks: {t.name!r} has kind {t.kind!r}; expected one of {sorted(DIGIT_TASK_KINDS)}")
        if self.model.image_size != self.data.image_size:
            raise ValueError(f"model.image_size={self.model.image_size} must equal data.image_size={self.data.image_size}")
        if self.model.channels != 1:
            raise ValueError(f"model.channels must be 1 for the digits images, got {self.model.channels}")
