"""semoe_combine and semoe_expert_count: forward, gradients, identity, error checks."""

import numpy as np
import paddle
import pytest

from paddle_semoe import ops
from tests._helpers import assert_close, assert_equal


def _routing(T, D, E, K, cf, seed=0):
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal((T, D)).astype("float32"))
    logits = paddle.to_tensor(rng.standard_normal((T, E)).astype("float32"))
    return x, ops.gate_dispatch(x, logits, top_k=K, capacity_factor=cf, normalize=True, backend="custom")


@pytest.mark.parametrize("T,D,E,K,cf", [(64, 16, 8, 2, 1.25), (40, 8, 5, 2, 0.25), (20, 4, 4, 4, 0.0), (7, 3, 2, 1, 1.0)])
def test_combine_forward_and_grads_match_reference(T, D, E, K, cf):
    _, r = _routing(T, D, E, K, cf, seed=T)
    rng = np.random.default_rng(1)
    rows0 = paddle.to_tensor(rng.standard_normal(r.rows.shape).astype("float32"))
    g_out = paddle.to_tensor(rng.standard_normal((T, D)).astype("float32"))
    res = {}
    for backend in ("custom", "reference"):
        rows, w = rows0.clone(), r.weights.detach().clone()
        rows.stop_gradient = w.stop_gradient = False
        out = ops.combine(rows, w, r.positions, backend=backend)
        (out * g_out).sum().backward()
        res[backend] = (out, rows.grad, w.grad)
    for i, what in enumerate(("out", "grad rows", "grad weights")):
        assert_close(res["custom"][i], res["reference"][i], rtol=1e-5, atol=1e-5, what=what)
    # dropped choices get zero weight gradient; unreferenced rows zero row gradient
    pos = r.positions.numpy()
    assert (res["custom"][2].numpy()[pos < 0] == 0).all()
    used = np.zeros(r.rows.shape[0], bool)
    used[pos[pos >= 0]] = True
    assert not res["custom"][1].numpy()[~used].any()


@pytest.mark.parametrize("K", [1, 2, 3])
def test_dispatch_then_combine_with_unit_weights_is_identity(K):
    x, r = _routing(50, 12, 6, K, 0.0, seed=K)  # dropless: every copy computed
    y = ops.combine(r.rows, paddle.full([50, K], 1.0 / K), r.positions, backend="custom")
    assert_close(y, x, rtol=1e-6, atol=1e-6)
    if K == 1:
        assert_equal(ops.combine(r.rows, paddle.ones([50, 1]), r.positions), x)


def test_combine_zero_tokens_and_empty_rows():
    out = ops.combine(paddle.zeros([0, 5]), paddle.zeros([0, 2]), paddle.zeros([0, 2], dtype="int32"))
    assert out.shape == [0, 5]
    out = ops.combine(paddle.zeros([0, 5]), paddle.ones([3, 2]), paddle.full([3, 2], -1, dtype="int32"))
    assert_equal(out, np.zeros((3, 5), np.float32))


def test_combine_rejects_bad_positions():
    rows = paddle.randn([4, 3])
    w = paddle.ones([2, 2])
    with pytest.raises(Exception, match="out of range .* or repeats"):
        ops.combine(rows, w, paddle.to_tensor([[0, 1], [1, 2]], dtype="int32"))
    with pytest.raises(Exception, match="out of range"):
        ops.combine(rows, w, paddle.to_tensor([[0, 4], [1, 2]], dtype="int32"))
    with pytest.raises(ValueError, match="'positions' must be"):
        ops.combine(rows, w, paddle.to_tensor([[0, 1], [2, 3]], dtype="int64"))
    with pytest.raises(ValueError, match="weights .* and positions .* differ"):
        ops.combine(rows, paddle.ones([2, 3]), paddle.to_tensor([[0, 1], [2, 3]], dtype="int32"))
    with pytest.raises(ValueError, match="'rows' must be float32"):
        ops.combine(rows.astype("float64"), w, paddle.to_tensor([[0, 1], [2, 3]], dtype="int32"))


def test_combine_bit_identical_across_runs():
    _, r = _routing(200, 64, 8, 2, 1.0, seed=3)
    a = ops.combine(r.rows, r.weights, r.positions)
    b = ops.combine(r.rows, r.weights, r.positions)
    assert_equal(a, b)


def test_expert_count_matches_numpy():
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 7, size=(100, 3)).astype("int32")
    for backend in ("custom", "reference"):
        got = ops.expert_count(paddle.to_tensor(ids), 6, backend=backend)
        want = np.bincount(ids[(ids >= 0) & (ids < 6)], minlength=6)
        assert_equal(got, want.astype("int32"), backend)
    assert_equal(ops.expert_count(paddle.zeros([0, 2], dtype="int32"), 3), np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="'ids' must be"):
        ops.expert_count(paddle.zeros([4], dtype="int64"), 3)
    with pytest.raises(ValueError, match="num_experts must be positive"):
        ops.expert_count(paddle.zeros([4], dtype="int32"), 0)
