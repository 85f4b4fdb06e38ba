"""The routers end to end on 2 CPU processes (EP=2): the aux-free balance bias is the same on
every rank (rank 0 saves it), lives in checkpoints and resumes exactly, beside shared experts
and sigmoid scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from paddle_semoe.io.checkpoint import read_manifest
from tests.dist import train_runner as tr

CONFIG = Path(__file__).resolve().parents[1] / "assets" / "gpt_moe_test.yaml"
AUX_FREE = ["model.moe.router=aux_free", "model.moe.bias_update_rate=0.01", "model.moe.score_fn=sigmoid",
            "model.moe.num_shared_experts=1", "train.eval_every=1000"]


def _ok(res: tr.RunResult) -> None:
    assert res.returncode == 0, res.output[-6000:]


def _buffers(ckpt: Path) -> dict[str, np.ndarray]:
    tensors, _ = read_manifest(ckpt).shard(0)
    return {k: v for k, v in tensors.items() if k.startswith("buffer/")}


def test_aux_free_bias_checkpointed_and_resumed_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _ok(tr.run(2, CONFIG, [f"train.output_dir={full}", "train.max_steps=4", "train.save_every=2", *AUX_FREE], tmp_path))
    _ok(tr.run(2, CONFIG, [f"train.output_dir={part}", "train.max_steps=2", "train.save_every=2", *AUX_FREE], tmp_path))
    _ok(tr.run(2, CONFIG, [f"train.output_dir={part}", "train.max_steps=4", "train.save_every=2", "train.resume=auto",
                           *AUX_FREE], tmp_path))
    b2 = _buffers(full / "checkpoints" / "step_00000002")
    b4 = _buffers(full / "checkpoints" / "step_00000004")
    assert sorted(b4) == ["buffer/blocks.0.ffn.router.balance_bias", "buffer/blocks.1.ffn.router.balance_bias"]
    for k, v in b4.items():
        assert v.any(), f"{k} never moved"
        # 4 updates of +-0.01 (or 0): every entry is a multiple of the rate, at most 4 steps away
        np.testing.assert_allclose(v / 0.01, np.round(v / 0.01), atol=1e-4, err_msg=k)
        assert np.abs(v).max() <= 0.04 + 1e-6
        assert not np.array_equal(v, b2[k]) or not v.any()
    resumed = _buffers(part / "checkpoints" / "step_00000004")
    for k in b4:
        np.testing.assert_array_equal(resumed[k], b4[k], err_msg=f"{k}: resumed != uninterrupted")
    m_full, m_part = tr.metrics(full / "metrics.jsonl"), tr.metrics(part / "metrics.jsonl")
    for s in (3, 4):
        assert m_full[s]["loss"] == m_part[s]["loss"], f"step {s}: resumed {m_part[s]['loss']} != {m_full[s]['loss']}"
    # monitoring: per-layer load, dropped share per choice rank and the bias, in metrics.jsonl
    routing = tr.metrics(full / "metrics.jsonl", kind="routing")
    assert sorted(routing) == [1, 2, 3, 4]
    last = routing[4]
    for layer in (0, 1):
        assert last[f"load_max_over_mean/layer{layer}"] >= 1.0
        assert 0.0 <= last[f"dropped_choice0/layer{layer}"] <= last[f"dropped_choice1/layer{layer}"] + 1.0
        bias = b4[f"buffer/blocks.{layer}.ffn.router.balance_bias"]
        assert last[f"balance_bias_absmean/layer{layer}"] == pytest.approx(float(np.abs(bias).mean()), rel=1e-6)
