"""Serving runs the training code: one Block / MoELayer forward for training, export and serving.

The served model is the training ``GPTMoE`` itself (dense weights from the package, expert
weights from a provider through ``GroupedExperts.weight_source``), so with the same weights, in
eval mode and with routing that cannot drop, every serving mode gives the training model's
logits bit for bit, for a full pass and for cached decoding.
"""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddle_semoe.inference.export import export_package
from paddle_semoe.inference.package import read_manifest
from paddle_semoe.inference.ring import LayerWeights
from paddle_semoe.inference.runner import InferenceModel, ServeConfig
from paddle_semoe.models.gpt import GPTConfig, GPTMoE
from paddle_semoe.moe import MoESettings

SERVES = {
    "resident": ServeConfig(mode="resident", source="host"),
    "ring1": ServeConfig(mode="ring", num_slots=1, source="disk", direct_io=False),
    "ring2": ServeConfig(mode="ring", num_slots=2, source="disk"),
    "naive": ServeConfig(mode="naive", source="host"),
    "cache3": ServeConfig(mode="cache", num_slots=3, source="disk", verify_reads=True),
    "cache1": ServeConfig(mode="cache", num_slots=1, source="host", prefetch=False),
}


def _model(moe: MoESettings) -> GPTMoE:
    paddle.seed(21)
    model = GPTMoE(GPTConfig(d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=32, moe_every=2, moe=moe))
    for p in model.parameters():  # sharper routing than the init gives
        p.set_value(p * 6.0 if len(p.shape) >= 2 else p)
    model.eval()
    return model


@pytest.mark.parametrize(
    "moe",
    [
        MoESettings(num_experts=4, top_k=2, dropless=True),
        # eval capacity ceil(2.0 * T * 2 / 4) = T: no expert can overflow, so nothing drops
        MoESettings(num_experts=4, top_k=2, capacity_factor=0.5, eval_capacity_factor=2.0),
    ],
    ids=["dropless", "eval_capacity_cannot_drop"],
)
def test_every_serving_mode_gives_the_training_logits(moe, tmp_path):
    model = _model(moe)
    man = read_manifest(export_package(model, tmp_path / "pkg", graphs=False))
    x = paddle.to_tensor(np.random.default_rng(4).integers(0, 256, (3, 11)).astype(np.int64))
    with paddle.no_grad():
        full = model(x)
        first = model(x[:, :6])
        rest = model(x[:, 6:], caches=first.caches)
    assert float(full.moe_stats[0].dropped_fraction) == 0.0
    for name, serve in SERVES.items():
        served = InferenceModel.load(man, serve)
        try:
            # one code path: the served model is the training model class, experts from the provider
            assert type(served.model) is GPTMoE
            assert all(isinstance(m.experts.weight_source, LayerWeights) for m in served.model.moe_layers())
            logits, _ = served.forward(x)
            np.testing.assert_array_equal(logits.numpy(), full.logits.numpy(), err_msg=name)
            a, caches = served.forward(x[:, :6])
            b, _ = served.forward(x[:, 6:], caches)
            np.testing.assert_array_equal(a.numpy(), first.logits.numpy(), err_msg=f"{name} prefill")
            np.testing.assert_array_equal(b.numpy(), rest.logits.numpy(), err_msg=f"{name} cached decode")
        finally:
            served.close()


def test_serving_routes_dropless_where_training_eval_would_drop(tmp_path):
    """A capacity that drops in the training model's eval mode does not drop in serving: the
    served logits equal the training model's with ``eval_dropless`` set, and differ without."""
    model = _model(MoESettings(num_experts=4, top_k=2, capacity_factor=0.25, eval_capacity_factor=0.25))
    man = read_manifest(export_package(model, tmp_path / "pkg", graphs=False))
    x = paddle.to_tensor(np.random.default_rng(5).integers(0, 256, (2, 16)).astype(np.int64))
    with paddle.no_grad():
        dropping = model(x)
        model.set_eval_dropless(True)
        dropless = model(x)
    assert float(dropping.moe_stats[0].dropped_fraction) > 0.0
    assert float(dropless.moe_stats[0].dropped_fraction) == 0.0
    served = InferenceModel.load(man, SERVES["ring1"])
    try:
        logits, _ = served.forward(x)
    finally:
        served.close()
    np.testing.assert_array_equal(logits.numpy(), dropless.logits.numpy())
    assert not np.array_equal(logits.numpy(), dropping.logits.numpy())
