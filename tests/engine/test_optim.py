"""Learning-rate schedule and optimizer partitioning by parameter class."""

import math

import pytest

from paddle_semoe.engine.config import OptimConfig
from paddle_semoe.engine.optim import MoEOptimizer, lr_at
from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_at(s, cfg, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 20) == pytest.approx(1.0)
    assert lr_at(12, cfg, 20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20, cfg, 20) == pytest.approx(0.1)
    assert lr_at(100, cfg, 20) == pytest.approx(0.1)
    lin = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert lr_at(5, lin, 10) == pytest.approx(0.5)
    assert lr_at(3, OptimConfig(lr=0.5, warmup_steps=0, schedule="constant"), 10) == 0.5


def test_expert_parameters_get_their_own_optimizer():
    model = GPTMoE(GPTConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, moe_every=2, moe=MoESettings(num_experts=2)))
    opt = MoEOptimizer(model, OptimConfig())
    names = {id(p) for p in opt.expert_params}
    experts = {id(p) for n, p in model.named_parameters() if ".experts." in n}
    assert names == experts and len(experts) == 4
    assert not names & {id(p) for p in opt.dense_params}
    opt.set_lr(0.123)
    assert opt.dense.get_lr() == opt.expert.get_lr() == 0.123
