"""Expert compression: the merge plan, identity at full size, shapes and distillation progress."""

import numpy as np
import paddle
import pytest

from paddle_semoe.data import TokenBatcher
from paddle_semoe.inference import compression as C
from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings


def test_merge_plan_keeps_the_most_used_and_joins_the_most_similar():
    w = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [1.0, 1.0]])
    usage = np.array([10, 8, 1, 2, 0])
    assert C.merge_plan(w, usage, keep=2) == [[0, 2, 4], [1, 3]]
    assert C.merge_plan(w, usage, keep=5) == [[0], [1], [2], [3], [4]]
    with pytest.raises(ValueError, match="keep must be in"):
        C.merge_plan(w, usage, keep=0)


@pytest.fixture(scope="module")
def teacher():
    paddle.seed(5)
    return GPTMoE(GPTConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, moe_every=1,
                            moe=MoESettings(num_experts=4, top_k=2, eval_capacity_factor=2.0)))


def _batches(n=3, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 256, 5000)
    return [b for _, b in zip(range(n), TokenBatcher(tokens, 4, 16, seed=seed))]


def test_full_size_compression_is_the_identity(teacher):
    usage = C.routing_statistics(teacher, _batches())
    assert set(usage) == {0, 1} and all(u.sum() == 3 * 4 * 16 * 2 for u in usage.values())
    same = C.compress_model(teacher, usage, keep=4)
    x = paddle.to_tensor(_batches(1)[0][:, :-1])
    teacher.eval(), same.eval()
    # experts may be reordered; routing and outputs are the same function
    np.testing.assert_allclose(same(x).logits.numpy(), teacher(x).logits.numpy(), rtol=1e-5, atol=1e-5)


def test_compressed_model_is_smaller_and_distillation_reduces_kl(teacher):
    usage = C.routing_statistics(teacher, _batches())
    student = C.compress_model(teacher, usage, keep=1)
    assert student.config.moe.num_experts == 1 and student.config.moe.top_k == 1
    assert student.blocks[0].ffn.experts.w1.shape == [1, 32, 64]
    assert C.expert_bytes(student.config) * 4 == C.expert_bytes(teacher.config)
    kl = C.distil(student, teacher, iter(_batches(30, seed=1)), steps=30, lr=3e-3)
    assert len(kl) == 30 and np.mean(kl[-5:]) < np.mean(kl[:5])
