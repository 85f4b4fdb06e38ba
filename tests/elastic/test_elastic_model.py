"""The UFO model: plan-independent initialization, task routing, straight-through choice."""

from __future__ import annotations

import zlib

import numpy as np
import paddle
import pytest

from paddle_semoe.models.task_route import local_expert_ids, task_route
from paddle_semoe.params import task_of
from paddle_semoe.models.ufo import TaskMoE, UFOConfig

from tests.elastic import _ufo_problem as up


def test_a_subset_model_holds_bit_identical_copies_of_its_parameters():
    full = dict(up.build(range(4)).named_parameters())
    part = dict(up.build([2]).named_parameters())
    assert set(part) < set(full)
    for n, p in part.items():
        np.testing.assert_array_equal(p.numpy(), full[n].numpy(), err_msg=n)
    tasks = {task_of(p) for p in part.values()}
    assert tasks == {None, 2}
    assert not any("digit" in n for n in part)


def test_task_route_is_a_stable_expert_major_permutation():
    ids = paddle.to_tensor(np.array([2, 0, 1, 0, 2, 2, 0], np.int32))
    r = task_route(ids, 4)
    np.testing.assert_array_equal(r.order.numpy(), [1, 3, 6, 2, 0, 4, 5])
    np.testing.assert_array_equal(r.counts.numpy(), [3, 1, 3, 0])
    np.testing.assert_array_equal(r.positions.numpy()[:, 0], [4, 0, 3, 1, 5, 6, 2])
    ids0 = task_route(paddle.zeros([0], dtype="int32"), 2)
    assert ids0.counts.numpy().tolist() == [0, 0]
    with pytest.raises(ValueError, match="int32"):
        task_route(paddle.zeros([3], dtype="int64"), 2)


def test_local_ids():
    ids = local_expert_ids(paddle.to_tensor(np.array([0, 1, 1], np.int32)), paddle.to_tensor([True, False, True]))
    assert ids.numpy().tolist() == [1, 0, 2]


def _np_ffn(x, w1, b1, w2, b2):
    h = x @ w1 + b1
    h = 0.5 * h * (1.0 + np.vectorize(__import__("math").erf)(h / np.sqrt(2.0)))
    return h @ w2 + b2


def test_task_moe_output_is_the_chosen_experts_ffn_with_a_straight_through_gradient():
    paddle.seed(3)
    moe = TaskMoE(8, 12, hosted=[1, 3], names=["a", "b", "c", "d"], activation="gelu", backend=None)
    for _, p in moe.named_parameters():
        p.set_value(np.random.default_rng(zlib.crc32(_.encode())).normal(0, 0.5, p.shape).astype(np.float32))
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32))
    x.stop_gradient = False
    task_local = paddle.to_tensor(np.array([0, 1] * 5, np.int32))
    y, use = moe(x, task_local)
    xs, u, tl = x.numpy(), use.numpy(), task_local.numpy()
    names = ["b", "d"]
    for i in range(10):
        e = moe.experts[names[tl[i]]] if u[i] else moe.shared
        want = _np_ffn(xs[i], e.w1.numpy(), e.b1.numpy(), e.w2.numpy(), e.b2.numpy())
        np.testing.assert_allclose(y.numpy()[i], want, rtol=1e-4, atol=1e-5)
        # the hard choice is the arg-max of the token's own task gate
        g = moe.gates[names[tl[i]]]
        logits = xs[i] @ g.weight.numpy() + g.bias.numpy()
        assert bool(u[i]) == bool(logits[1] > logits[0])
    assert 0 < u.sum() < 10  # both experts are used
    y.sum().backward()
    for n in names:
        assert float(paddle.abs(moe.gates[n].weight.grad).sum()) > 0, "straight-through gradient reaches the gate"
    assert x.grad is not None and float(paddle.abs(x.grad).sum()) > 0


def test_model_forward_shapes_and_heads():
    m = up.build([0, 3])
    x = paddle.rand([5, 1, 8, 8])
    out = m(x, paddle.to_tensor(np.array([0, 0, 1, 1, 1], np.int32)))
    assert out.cls.shape == [5, up.CFG.d_model]
    assert len(out.use_task) == up.CFG.n_layers  # moe_every=1
    assert m.head(3, out.cls).shape == [5, 4]
    with pytest.raises(ValueError, match=r"task 1 \(parity\) is not hosted here"):
        m.head(1, out.cls)


def test_config_validation():
    with pytest.raises(ValueError, match="patch_size=3 must divide image_size=8"):
        UFOConfig(patch_size=3)
    with pytest.raises(ValueError, match="activation"):
        UFOConfig(activation="tanh")
    assert UFOConfig().seq_len == 17
    assert UFOConfig().flops_per_sample() > 0
