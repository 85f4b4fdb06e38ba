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
    la, lb = float(a.accumulate_gradients(batch).lm_loss), float(b.accumulate_gradients(batch).lm_loss)
    assert abs(la - lb) < 1e-5
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        scale = float(np.abs(pa.grad.numpy()).max()) + 1e-12
        np.testing.assert_allclose(pb.grad.numpy(), pa.grad.numpy(), rtol=1e-4, atol=1e-5 * scale, err_msg=n)


def _host_reads_by_the_trainer(monkeypatch) -> list[str]:
    """Record every device -> host read (numpy, float, item) that engine/trainer.py itself makes."""
    import inspect

    import paddle

    import paddle_semoe.engine.trainer as trainer_module

    reads: list[str] = []
    for name in ("numpy", "__float__", "item", "tolist"):
        original = getattr(paddle.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            caller = inspect.currentframe().f_back
            if caller is not None and caller.f_code.co_filename == trainer_module.__file__:
                reads.append(f"{_name}@{caller.f_code.co_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(paddle.Tensor, name, wrapper)
    return reads


def test_routing_statistics_stay_on_the_device_until_a_log_step(tmp_path, monkeypatch):
    t = _trainer(tmp_path / "a", "optim.grad_accum_steps=2", "model.moe.dropless=false")
    batch = next(t.batcher)
    reads = _host_reads_by_the_trainer(monkeypatch)
    sums = t.accumulate_gradients(batch)
    assert reads == [], reads  # two micro-steps, two MoE layers: no sync
    monkeypatch.undo()
    assert [list(d.shape) for d in sums.demand] == [[4], [4]]
    routed = 8 * 32 * 2  # tokens of the batch x top_k, summed over both micro-batches
    assert [int(d.numpy().sum()) for d in sums.demand] == [routed, routed]
    assert 0.0 <= float(sums.dropped) < 1.0
    assert abs(float(sums.loss) - float(sums.lm_loss) - float(sums.aux_loss)) < 1e-6


def test_lazy_update_reads_kept_rows_once_per_step(tmp_path, monkeypatch):
    t = _trainer(tmp_path / "a", "optim.grad_accum_steps=2", "optim.expert_update=lazy")
    batch = next(t.batcher)
    reads = _host_reads_by_the_trainer(monkeypatch)
    t.accumulate_gradients(batch)
    assert [r.split("@")[0] for r in reads] == ["numpy", "numpy"], reads  # one per MoE layer, not per micro-step
    monkeypatch.undo()
    assert [int(k.sum()) for k in t._lazy_kept] == [8 * 32 * 2] * 2  # dropless: every choice kept
