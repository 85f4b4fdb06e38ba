"""semoe_grouped_ffn against the sequential per-expert reference, forward and all gradients."""

import numpy as np
import paddle
import pytest

from paddle_semoe import ops
from tests._helpers import assert_close, assert_equal


def _weights(E, D, F, seed=0):
    rng = np.random.default_rng(seed)
    mk = lambda *s: paddle.to_tensor((0.3 * rng.standard_normal(s)).astype("float32"))  # noqa: E731
    return mk(E, D, F), mk(E, F), mk(E, F, D), mk(E, D)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
# small inputs (serial experts on any thread count); test_grouped_ffn_threads.py covers the
# threaded work splits (row ranges, whole experts, row slices) on 1 and 2 threads
@pytest.mark.parametrize("counts,R", [([5, 0, 7, 3], 15), ([4, 4], 12), ([0, 0, 0], 5), ([9], 9), ([0, 0], 0),
                                      ([6, 3, 0, 8, 5, 2, 7, 1], 35)])
def test_matches_sequential_reference(activation, counts, R):
    E, D, F = len(counts), 8, 24
    w = _weights(E, D, F, seed=R + E)
    rng = np.random.default_rng(2)
    x0 = paddle.to_tensor(rng.standard_normal((R, D)).astype("float32"))
    c = paddle.to_tensor(np.array(counts, np.int32))
    g = paddle.to_tensor(rng.standard_normal((R, D)).astype("float32"))
    res = {}
    for backend in ("custom", "reference"):
        x = x0.clone()
        params = [t.clone() for t in w]
        for t in [x, *params]:
            t.stop_gradient = False
        y = ops.grouped_ffn(x, c, *params, activation=activation, backend=backend)
        if R:
            (y * g).sum().backward()
        res[backend] = [y, x.grad, *[p.grad for p in params]]
    names = ["out", "grad x", "grad w1", "grad b1", "grad w2", "grad b2"]
    for a, b, name in zip(res["custom"], res["reference"], names):
        if b is None:  # the reference never touched this tensor (no rows for it)
            assert a is None or not a.numpy().any(), name
            continue
        assert_close(a, b, rtol=2e-5, atol=2e-5, what=f"{activation} {name}")
    used = sum(counts)
    assert not res["custom"][0].numpy()[used:].any(), "rows past sum(counts) must be zero"
    if R:
        empty = [e for e, n in enumerate(counts) if n == 0]
        for e in empty:
            assert not res["custom"][2].numpy()[e].any(), "an expert without rows gets zero grad"


def test_gelu_gradient_matches_the_exact_derivative_over_a_wide_range():
    # D = 1, w1 = ones, b1 = 0: every hidden unit of row r holds x[r]; w2 keeps unit 0 only, so
    # the gradient of sum(y) with respect to x[r] is gelu'(x[r]) (F = 19: a 16-lane block and a
    # 3-lane tail of the vectorized activation pass)
    from math import erf, pi, sqrt

    xs = np.concatenate([np.linspace(-40.0, 40.0, 4001), [0.0, -0.0, 1e-30, -1e-30]])
    xs = xs.astype("float32")
    R, F = xs.size, 19
    x = paddle.to_tensor(xs.reshape(R, 1))
    x.stop_gradient = False
    w2 = np.zeros((1, F, 1), np.float32)
    w2[0, 0, 0] = 1.0
    counts = paddle.to_tensor([R], dtype="int32")
    y = ops.grouped_ffn(x, counts, paddle.ones([1, 1, F]), paddle.zeros([1, F]), paddle.to_tensor(w2),
                        paddle.zeros([1, 1]), activation="gelu", backend="custom")
    y.sum().backward()
    cdf = np.array([0.5 * (1 + erf(v / sqrt(2))) for v in xs.astype(float)])
    exact = cdf + xs.astype(float) * np.exp(-0.5 * xs.astype(float) ** 2) / sqrt(2 * pi)
    got = x.grad.numpy()[:, 0]
    assert np.abs(got - exact).max() < 1e-6, np.abs(got - exact).max()
    gelu = xs.astype(float) * cdf
    assert np.abs(y.numpy()[:, 0] - gelu).max() < 1e-6 * max(1.0, np.abs(xs).max())


def test_bit_identical_across_runs():
    w = _weights(4, 32, 64)
    x = paddle.randn([100, 32])
    c = paddle.to_tensor([30, 20, 0, 40], dtype="int32")
    assert_equal(ops.grouped_ffn(x, c, *w), ops.grouped_ffn(x, c, *w))


def test_errors_name_the_argument():
    w1, b1, w2, b2 = _weights(2, 4, 6)
    x = paddle.randn([5, 4])
    c = paddle.to_tensor([2, 3], dtype="int32")
    with pytest.raises(ValueError, match="'w1' must have shape"):
        ops.grouped_ffn(x, c, w2, b1, w2, b2)
    with pytest.raises(ValueError, match="'b2' must have shape"):
        ops.grouped_ffn(x, c, w1, b1, w2, b1)
    with pytest.raises(ValueError, match="'counts' must be"):
        ops.grouped_ffn(x, c.astype("int64"), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="unknown activation"):
        ops.grouped_ffn(x, c, w1, b1, w2, b2, activation="tanh")
    with pytest.raises(Exception, match=r"sum\(counts\) = 9 exceeds the 5 rows"):
        ops.grouped_ffn(x, paddle.to_tensor([4, 5], dtype="int32"), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="'x' must be float32"):
        ops.grouped_ffn(x.astype("float64"), c, w1, b1, w2, b2)


def test_cpu_gemm_is_onednn_here():
    # The x86 Paddle wheel links oneDNN; if this fails the fast path silently degraded.
    assert ops.cpu_gemm_backend("custom") in ("onednn", "cblas")


def test_experts_one_per_thread_agree_with_the_reference_call_after_call():
    """Experts running one per thread must not share scratch or outputs: a race shows up as an
    occasional wrong expert, so the comparison repeats (it caught a schedule(dynamic) loop that
    ran every expert on every thread under Paddle's two OpenMP runtimes)."""
    counts = [130, 120, 140, 122, 90, 0, 111, 101]
    E, D, F = len(counts), 64, 256
    w = _weights(E, D, F, seed=5)
    x = paddle.to_tensor(np.random.default_rng(3).standard_normal((sum(counts), D)).astype("float32"))
    c = paddle.to_tensor(np.array(counts, np.int32))
    ref = ops.grouped_ffn(x, c, *w, backend="reference")
    for _ in range(25):
        assert_close(ops.grouped_ffn(x, c, *w, backend="custom"), ref, rtol=2e-5, atol=2e-5, what="forward")
