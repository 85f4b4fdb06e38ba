"""The trainer in one process: gradient accumulation equals one large batch."""

from pathlib import Path

import numpy as np

from paddle_semoe.comm import Topology
from paddle_semoe.config import load_config
from paddle_semoe.engine.config import TrainConfig
from paddle_semoe.engine.distributed import DistContext
from paddle_semoe.engine.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "assets" / "gpt_moe_test.yaml"


def _trainer(tmp_path, *overrides):
    # dropless and no load-balance loss: per-micro-batch routing statistics would otherwise differ
    cfg = load_config(TrainConfig, CONFIG, ["parallel.ep_degree=1", "model.moe.dropless=true", "model.moe.aux_loss_coef=0.0",
                                             f"train.output_dir={tmp_path}", *overrides])
    return Trainer(cfg, DistContext(1, 0, cfg.parallel.resolve(1), Topology.single()))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    a = _trainer(tmp_path / "a", "optim.grad_accum_steps=1")
    b = _trainer(tmp_path / "b", "optim.grad_accum_steps=2")
    batch = next(a.batcher)
    la, lb = a.accumulate_gradients(batch)[1], b.accumulate_gradients(batch)[1]
    assert abs(la - lb) < 1e-5
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        scale = float(np.abs(pa.grad.numpy()).max()) + 1e-12
        np.testing.assert_allclose(pb.grad.numpy(), pa.grad.numpy(), rtol=1e-4, atol=1e-5 * scale, err_msg=n)
