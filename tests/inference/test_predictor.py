"""The Paddle Inference path's runtime (predictor.py): tensors pass between the graphs without
copies, the key/value caches outlive the graphs' next runs, and the graphs run the dygraph
path's native CPU kernels (bit-identical logits and caches)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_semoe.inference.export import export_package
from paddle_semoe.inference.package import read_manifest
from paddle_semoe.inference.predictor import PaddleInferenceModel
from paddle_semoe.inference.runner import InferenceModel, ServeConfig
from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings

RESIDENT = ServeConfig(mode="resident", source="host")
RING1 = ServeConfig(mode="ring", num_slots=1, source="disk", direct_io=False)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    paddle.seed(5)
    # blocks 1 and 3 MoE, 0 and 2 dense; 48 positions: room for a long pass before a generation
    cfg = GPTConfig(d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=48, moe_every=2,
                    moe=MoESettings(num_experts=4, top_k=2))
    model = GPTMoE(cfg)
    for p in model.parameters():  # a non-trivial greedy output: larger weights than the init
        p.set_value(p * 8.0 if len(p.shape) >= 2 else p)
    return export_package(model, tmp_path_factory.mktemp("pkg") / "pkg")


def _tokens(B=2, S=6, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (B, S)).astype(np.int64)


def test_logits_bit_identical_to_the_dygraph_runner_in_prefill_and_cached_decode(package):
    man = read_manifest(package)
    dy = InferenceModel.load(man, RESIDENT)
    pi = PaddleInferenceModel(man, RESIDENT)
    try:
        x = _tokens(S=9)
        full, _ = dy.forward(paddle.to_tensor(x))
        np.testing.assert_array_equal(pi.forward(x), full.numpy())
        a_dy, caches_dy = dy.forward(paddle.to_tensor(x[:, :5]))
        a_pi, caches_pi = pi.step(x[:, :5], pi.empty_caches(2))
        np.testing.assert_array_equal(a_pi, a_dy.numpy())
        for t in range(5, 9):
            b_dy, caches_dy = dy.forward(paddle.to_tensor(x[:, t : t + 1]), caches_dy)
            b_pi, caches_pi = pi.step(x[:, t : t + 1], caches_pi)
            np.testing.assert_array_equal(b_pi, b_dy.numpy(), err_msg=f"decode position {t}")
            for (k_pi, v_pi), c_dy in zip(caches_pi, caches_dy):
                np.testing.assert_array_equal(k_pi.numpy(), c_dy.k.numpy())
                np.testing.assert_array_equal(v_pi.numpy(), c_dy.v.numpy())
    finally:
        dy.close(), pi.close()


@pytest.mark.parametrize("serve", [RESIDENT, RING1], ids=["resident", "ring1"])
def test_generation_after_a_longer_pass_gives_the_same_tokens(package, serve):
    """A graph writes its next output into the allocation of its last one when it fits: after a
    40-token pass every cache of a shorter generation fits there, so caches kept without a copy
    would be overwritten by the step that reads them."""
    man = read_manifest(package)
    dy = InferenceModel.load(man, RESIDENT)
    pi = PaddleInferenceModel(man, serve)
    try:
        prompts = _tokens(S=5, seed=1)
        ref = dy.generate(prompts, 12)
        first = pi.generate(prompts, 12)
        np.testing.assert_array_equal(first.tokens, ref.tokens)
        long_logits = pi.forward(_tokens(S=40, seed=2))
        np.testing.assert_array_equal(long_logits, dy.forward(paddle.to_tensor(_tokens(S=40, seed=2)))[0].numpy())
        for _ in range(2):
            np.testing.assert_array_equal(pi.generate(prompts, 12).tokens, ref.tokens)
    finally:
        dy.close(), pi.close()


def test_step_caches_stay_valid_while_other_sequences_step(package):
    """Caches of one sequence survive steps of another (whose outputs fit into their allocation)."""
    man = read_manifest(package)
    dy = InferenceModel.load(man, RESIDENT)
    pi = PaddleInferenceModel(man, RESIDENT)
    try:
        x, y = _tokens(S=11, seed=3), _tokens(S=5, seed=4)
        _, caches_dy = dy.forward(paddle.to_tensor(x[:, :10]))
        ref, _ = dy.forward(paddle.to_tensor(x[:, 10:11]), caches_dy)
        _, caches = pi.step(x[:, :10], pi.empty_caches(2))
        kept = [(k.numpy().copy(), v.numpy().copy()) for k, v in caches]
        _, other = pi.step(y[:, :4], pi.empty_caches(2))  # shorter: fits where the 10-position caches were written
        _, other = pi.step(y[:, 4:5], other)
        for (k, v), (k0, v0) in zip(caches, kept):
            np.testing.assert_array_equal(k.numpy(), k0)
            np.testing.assert_array_equal(v.numpy(), v0)
        logits, _ = pi.step(x[:, 10:11], caches)  # resume the first sequence
        np.testing.assert_array_equal(logits, ref.numpy())
        assert other[0][0].shape[2] == 5 and caches[0][0].shape[2] == 10
    finally:
        dy.close(), pi.close()
