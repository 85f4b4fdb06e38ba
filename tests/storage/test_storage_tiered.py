"""Tiered experts against resident experts, in one process: same losses, same expert states."""

from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_semoe.config import ConfigError, load_config
from paddle_semoe.engine.config import TrainConfig
from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings
from paddle_semoe.moe.experts import GroupedExperts, deferred_expert_weights
from paddle_semoe.storage.layout import PARAM_NAMES

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "tests" / "assets" / "gpt_moe_test.yaml"


def test_deferred_experts_allocate_nothing_and_leave_every_other_init_unchanged():
    cfg = GPTConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, moe_every=1, moe=MoESettings(num_experts=3))
    paddle.seed(5)
    full = GPTMoE(cfg)
    after_full = paddle.randn([4]).numpy()
    paddle.seed(5)
    with deferred_expert_weights():
        lazy = GPTMoE(cfg)
    after_lazy = paddle.randn([4]).numpy()
    np.testing.assert_array_equal(after_full, after_lazy)  # the generator advanced identically
    full_p = dict(full.named_parameters())
    lazy_p = dict(lazy.named_parameters())
    assert set(lazy_p) == {n for n in full_p if ".experts." not in n}
    for n, p in lazy_p.items():
        np.testing.assert_array_equal(p.numpy(), full_p[n].numpy(), err_msg=n)
    ge = [m for m in lazy.sublayers() if isinstance(m, GroupedExperts)][0]
    assert ge.w1 is None and (ge.d_model, ge.d_ff) == (16, 32)
    with pytest.raises(RuntimeError, match="attach a weight source"):
        ge(paddle.zeros([2, 16]), paddle.to_tensor([1, 1, 0], dtype="int32"))
    with deferred_expert_weights(False):
        assert [m for m in GPTMoE(cfg).sublayers() if isinstance(m, GroupedExperts)][0].w1 is not None


def _trainer(tmp_path: Path, name: str, extra: list[str]):
    from paddle_semoe.engine.distributed import init_distributed
    from paddle_semoe.engine.trainer import Trainer

    cfg = load_config(TrainConfig, CONFIG, [
        "parallel.ep_degree=1", "optim.expert_update=lazy", f"train.output_dir={tmp_path / name}",
        "optim.grad_accum_steps=2", "optim.grad_clip=0.05",  # micro-batch accumulation and clipping both exercised
        *extra,
    ])
    return Trainer(cfg, init_distributed(cfg))


def test_tiered_training_is_bit_identical_to_resident_lazy_training(tmp_path):
    resident = _trainer(tmp_path, "r", [])
    tiered = _trainer(tmp_path, "t", ["storage.enabled=true", "storage.host_cache_mb=0.6", "storage.working_set_mb=0.5"])
    try:
        from paddle_semoe.engine.optim import lr_at

        rng = np.random.default_rng(0)
        for step in range(4):
            batch = rng.integers(0, 256, size=(8, 33))
            out = []
            for tr in (resident, tiered):
                tr.optimizer.set_lr(lr_at(step, tr.cfg.optim, 8))
                out.append(tr.train_step(batch))
            assert out[0].loss == out[1].loss and out[0].grad_norm == out[1].grad_norm, (step, out)
        stats = tiered.tiered.interval_scalars()
        assert stats["evictions_per_step"] > 0 and stats["writebacks_per_step"] > 0  # the tiers were exercised
        assert resident.evaluate() == tiered.evaluate()
        # every expert state: the resident parameters and moments == the tiered store's
        tiered.tiered.cache.flush()
        lazy = resident.optimizer.lazy
        t = tiered.tiered
        for layer, ps in enumerate(lazy.layers):
            for e in range(t.E):
                entry, _, _ = t.cache.acquire(t.key(layer, e))
                try:
                    sec = t.layout.views(t.cache.slot_floats(entry))
                    for k, name in enumerate(PARAM_NAMES):
                        np.testing.assert_array_equal(sec["master"][name], ps[k].numpy()[e])
                        np.testing.assert_array_equal(sec["m"][name], lazy.m[layer][k][e])
                        np.testing.assert_array_equal(sec["v"][name], lazy.v[layer][k][e])
                finally:
                    t.cache.release(entry)
        assert t.verify() == t.L * t.E
    finally:
        tiered.tiered.close()


def test_tiered_checkpoint_round_trip_in_process(tmp_path):
    a = _trainer(tmp_path, "a", ["storage.enabled=true", "storage.host_cache_mb=0.6", "storage.working_set_mb=0.5"])
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, size=(8, 33)) for _ in range(4)]
    try:
        for b in batches[:2]:
            a.train_step(b)
        a.step = 2
        ckpt = a.save_checkpoint()
        assert (ckpt / "experts" / "rank_00000.json").exists() and len(list((ckpt / "experts").glob("*.bin"))) == 8
        later = [a.train_step(b).loss for b in batches[2:]]
    finally:
        a.tiered.close()
    b = _trainer(tmp_path, "b", ["storage.enabled=true", "storage.host_cache_mb=0.6", "storage.working_set_mb=0.5"])
    try:
        assert b.resume(str(ckpt)) and b.step == 2 and b.tiered.t == 2
        assert [b.train_step(x).loss for x in batches[2:]] == later
    finally:
        b.tiered.close()
    from paddle_semoe.io.checkpoint import CheckpointError

    c = _trainer(tmp_path, "c", [])
    with pytest.raises(CheckpointError, match="keeps its experts in the SSD tier; resume it with storage.enabled=true"):
        c.resume(str(ckpt))


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["storage.enabled=true"], "needs optim.expert_update=lazy"),
        (["storage.host_cache=3"], "did you mean 'storage.host_cache_mb'"),
        (["storage.lfu_beta=0.0"], "lfu_beta must be in (0, 1]"),
        (["storage.evict_threshold=1.5"], "evict_threshold must be in (0, 1]"),
        (["optim.expert_update=sparse"], "expert_update must be one of"),
        (["storage.enabled=true", "optim.expert_update=lazy", "model.moe_every=0"], "needs an MoE model"),
    ],
)
def test_storage_config_errors_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, CONFIG, overrides)
    assert fragment in str(info.value), str(info.value)


def test_tiered_storage_needs_every_expert_on_one_rank():
    from types import SimpleNamespace

    from paddle_semoe.io.model_state import ExpertLayout
    from paddle_semoe.storage.tiered import build_tiered_experts

    with pytest.raises(ValueError, match="parallel.ep_degree=1 must equal the number of processes \\(2\\)"):
        build_tiered_experts(SimpleNamespace(), None, ExpertLayout(1, 0, 4), rank=0, world_size=2)
