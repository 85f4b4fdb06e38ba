"""semoe_gate_dispatch: forward and gradients against the pure-Paddle reference and NumPy."""

import math

import numpy as np
import paddle
import pytest

from paddle_semoe import ops
from tests._helpers import assert_close, assert_equal


def _inputs(T, D, E, seed=0, skew=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D)).astype("float32")
    logits = rng.standard_normal((T, E)).astype("float32")
    if skew is not None:
        logits[:, skew] -= 30.0  # expert `skew` never wins
    return paddle.to_tensor(x), paddle.to_tensor(logits)


def _numpy_positions(ids, keep, E, cap):
    """Independent NumPy model of the contract's steps 6-7."""
    T, K = ids.shape
    fill = np.zeros(E, np.int64)
    rank = np.full((T, K), -1, np.int64)
    for t in range(T):
        for j in range(K):
            if not keep[t, j]:
                continue
            e = ids[t, j]
            if cap <= 0 or fill[e] < cap:
                rank[t, j] = fill[e]
            fill[e] += 1
    counts = np.minimum(fill, cap) if cap > 0 else fill
    off = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.where(rank >= 0, off[ids] + rank, -1)
    return pos.astype(np.int32), counts.astype(np.int32)


CASES = [
    # T, D, E, K, capacity_factor, normalize
    (64, 16, 8, 2, 1.25, True),
    (64, 16, 8, 1, 1.0, False),
    (50, 8, 4, 4, 1.0, True),  # k = E
    (40, 8, 5, 2, 0.25, True),  # heavy overflow past capacity
    (33, 12, 6, 3, 0.0, True),  # dropless
    (1, 4, 3, 2, 1.0, False),
]


@pytest.mark.parametrize("T,D,E,K,cf,normalize", CASES)
def test_forward_matches_reference_and_numpy(T, D, E, K, cf, normalize):
    x, logits = _inputs(T, D, E, seed=T + E)
    got = ops.gate_dispatch(x, logits, top_k=K, capacity_factor=cf, normalize=normalize, backend="custom")
    ref = ops.gate_dispatch(x, logits, top_k=K, capacity_factor=cf, normalize=normalize, backend="reference")
    cap = ops.expert_capacity(T, E, K, cf)
    assert got.rows.shape == [ops.dispatch_rows(T, E, K, cap), D]
    assert_equal(got.ids, ref.ids, "ids")
    assert_equal(got.positions, ref.positions, "positions")
    assert_equal(got.counts, ref.counts, "counts")
    assert_close(got.probs, ref.probs, what="probs")
    assert_close(got.weights, ref.weights, what="weights")
    assert_equal(got.rows, ref.rows, "rows")

    # independent NumPy model of ranks/positions/rows
    ids = got.ids.numpy()
    pos, counts = _numpy_positions(ids, np.ones_like(ids, bool), E, cap)
    assert_equal(got.positions, pos, "positions vs numpy")
    assert_equal(got.counts, counts, "counts vs numpy")
    rows, xn = got.rows.numpy(), x.numpy()
    for t in range(T):
        for j in range(K):
            if pos[t, j] >= 0:
                np.testing.assert_array_equal(rows[pos[t, j]], xn[t])
    assert not rows[counts.sum():].any(), "padding rows must be zero"
    if cap > 0:
        assert counts.max() <= cap, "an expert exceeded its capacity"
    # top-k order and weights
    p = got.probs.numpy()
    top = np.sort(p, axis=1)[:, ::-1][:, :K]
    np.testing.assert_allclose(np.take_along_axis(p, ids, 1), top, rtol=1e-6)
    w = top / top.sum(1, keepdims=True) if normalize else top
    np.testing.assert_allclose(got.weights.numpy(), w, rtol=1e-5)


def test_zero_tokens():
    x, logits = _inputs(0, 8, 4)
    for backend in ("custom", "reference"):
        r = ops.gate_dispatch(x, logits, top_k=2, capacity_factor=1.0, normalize=True, backend=backend)
        assert r.rows.shape == [0, 8] and r.weights.shape == [0, 2] and r.positions.shape == [0, 2]
        assert r.counts.numpy().tolist() == [0, 0, 0, 0]


def test_expert_with_no_tokens():
    x, logits = _inputs(32, 8, 4, skew=2)
    r = ops.gate_dispatch(x, logits, top_k=1, capacity_factor=2.0, normalize=False, backend="custom")
    assert r.counts.numpy()[2] == 0
    ref = ops.gate_dispatch(x, logits, top_k=1, capacity_factor=2.0, normalize=False, backend="reference")
    assert_equal(r.positions, ref.positions)


def test_ties_go_to_lower_expert_index():
    x = paddle.ones([3, 4])
    logits = paddle.to_tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, 0.0], [5.0, 1.0, 5.0, 5.0]])
    for backend in ("custom", "reference"):
        r = ops.gate_dispatch(x, logits, top_k=2, capacity_factor=0.0, normalize=True, backend=backend)
        assert r.ids.numpy().tolist() == [[0, 1], [1, 2], [0, 2]], backend


def test_capacity_cutoff_keeps_token_order():
    # all 10 tokens prefer expert 0; capacity ceil(0.5 * 10 * 1 / 2) = 3 keeps tokens 0, 1, 2
    x = paddle.arange(10, dtype="float32").reshape([10, 1]).tile([1, 4])
    logits = paddle.to_tensor(np.tile([[3.0, 0.0]], (10, 1)).astype("float32"))
    r = ops.gate_dispatch(x, logits, top_k=1, capacity_factor=0.5, normalize=False, backend="custom")
    assert r.positions.numpy().ravel().tolist() == [0, 1, 2] + [-1] * 7
    assert r.counts.numpy().tolist() == [3, 0]
    assert r.rows.numpy()[:3, 0].tolist() == [0.0, 1.0, 2.0]


def test_random_routing_matches_reference_and_rule():
    T, E = 200, 6
    x, logits = _inputs(T, 8, E, seed=7)
    noise = paddle.rand([T], dtype="float32")
    got = ops.gate_dispatch(x, logits, top_k=2, capacity_factor=0.0, normalize=True, noise=noise, backend="custom")
    ref = ops.gate_dispatch(x, logits, top_k=2, capacity_factor=0.0, normalize=True, noise=noise, backend="reference")
    assert_equal(got.positions, ref.positions)
    assert_equal(got.rows, ref.rows)
    p = np.take_along_axis(got.probs.numpy(), got.ids.numpy(), 1)
    dropped = noise.numpy() >= 2 * p[:, 1] / (p[:, 0] + p[:, 1])
    assert dropped.any() and not dropped.all()
    np.testing.assert_array_equal(got.positions.numpy()[:, 1] < 0, dropped)
    assert (got.positions.numpy()[:, 0] >= 0).all(), "the first choice is never randomly dropped"


@pytest.mark.parametrize("T,D,E,K,cf,normalize", CASES + [(0, 4, 3, 2, 1.0, True)])
def test_gradients_match_reference(T, D, E, K, cf, normalize):
    x0, l0 = _inputs(T, D, E, seed=3 * T + K)
    rng = np.random.default_rng(11)
    grads = {}
    for backend in ("custom", "reference"):
        x, logits = x0.clone(), l0.clone()
        x.stop_gradient = logits.stop_gradient = False
        r = ops.gate_dispatch(x, logits, top_k=K, capacity_factor=cf, normalize=normalize, backend=backend)
        rng = np.random.default_rng(11)
        g_rows = paddle.to_tensor(rng.standard_normal(r.rows.shape).astype("float32"))
        g_w = paddle.to_tensor(rng.standard_normal(r.weights.shape).astype("float32"))
        g_p = paddle.to_tensor(rng.standard_normal(r.probs.shape).astype("float32"))
        loss = (r.rows * g_rows).sum() + (r.weights * g_w).sum() + (r.probs * g_p).sum()
        loss.backward()
        grads[backend] = (x.grad, logits.grad)
    if T == 0:
        return
    assert_close(grads["custom"][0], grads["reference"][0], what="grad x")
    assert_close(grads["custom"][1], grads["reference"][1], rtol=1e-4, atol=1e-5, what="grad logits")


def test_grad_x_adds_over_k_copies():
    # dropless, k=3: every token has 3 copies, grad of sum(rows) w.r.t. x must be 3 everywhere
    x, logits = _inputs(16, 4, 5)
    x.stop_gradient = False
    r = ops.gate_dispatch(x, logits, top_k=3, capacity_factor=0.0, normalize=True, backend="custom")
    r.rows.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.full((16, 4), 3.0, np.float32))


def test_bit_identical_across_runs():
    x, logits = _inputs(300, 32, 16, seed=5)
    a = ops.gate_dispatch(x, logits, top_k=2, capacity_factor=1.0, normalize=True, backend="custom")
    b = ops.gate_dispatch(x, logits, top_k=2, capacity_factor=1.0, normalize=True, backend="custom")
    for name in a._fields:
        assert_equal(getattr(a, name), getattr(b, name), name)


def test_capacity_formula():
    assert ops.expert_capacity(4096, 8, 2, 1.25) == 1280
    assert ops.expert_capacity(10, 3, 1, 1.0) == math.ceil(10 / 3)
    assert ops.expert_capacity(10, 3, 1, 0.0) == 0
    assert ops.expert_capacity(200, 8, 2, 0.3) == 15  # 0.3 * 200 * 2 / 8 exactly, no float drift
    assert ops.expert_capacity(0, 8, 2, 1.0) == 0
    assert ops.dispatch_rows(10, 3, 2, 0) == 20
    assert ops.dispatch_rows(10, 3, 2, 4) == 12


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (paddle.randn([4, 8]).astype("float64"), paddle.randn([4, 3])), "'x' must be float32"),
        (lambda: (paddle.randn([4, 8]), paddle.randn([4, 3]).astype("float64")), "'logits' must be"),
        (lambda: (paddle.randn([4, 8]), paddle.randn([5, 3])), "disagree on tokens"),
        (lambda: (paddle.randn([4, 8, 2]), paddle.randn([4, 3])), r"'x' must have shape \[T, D\]"),
        (lambda: (paddle.randn([4, 8]), paddle.randn([4])), r"'logits' must have shape \[T, E\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, match):
    x, logits = make()
    with pytest.raises(ValueError, match=match):
        ops.gate_dispatch(x, logits, top_k=2, capacity_factor=1.0, normalize=True)


def test_bad_top_k_and_noise():
    x, logits = _inputs(4, 8, 3)
    with pytest.raises(ValueError, match="top_k must be in"):
        ops.gate_dispatch(x, logits, top_k=4, capacity_factor=1.0, normalize=True)
    with pytest.raises(ValueError, match="'noise' must have T=4"):
        ops.gate_dispatch(x, logits, top_k=2, capacity_factor=1.0, normalize=True, noise=paddle.rand([5]))


def test_kernel_checks_name_the_argument():
    """The C++ checks (second line of defence, e.g. for static-graph callers) name the argument."""
    lib = ops.resolve_backend("custom")
    x = paddle.randn([4, 8]).astype("float64")
    with pytest.raises(Exception, match="argument 'x' must be float32"):
        lib.semoe_gate_dispatch(x, paddle.randn([4, 3]), paddle.zeros([0]), 2, 10**6, True)
    with pytest.raises(Exception, match="top_k must be in"):
        lib.semoe_gate_dispatch(paddle.randn([4, 8]), paddle.randn([4, 3]), paddle.zeros([0]), 9, 10**6, True)
