"""The lazy expert AdamW kernel: Paddle's AdamW formula, in place, independent of memory layout."""

import numpy as np
import paddle
import pytest

from paddle_semoe.storage.adamw import AdamWHyper, adamw_update_, sq_sum, step_scalars

H = AdamWHyper(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01)


def _ref(p, m, v, g, lr, t, scale=1.0, decay=True):
    """Float64 AdamW (decoupled decay, Paddle's epsilon placement)."""
    p, m, v, g = (x.astype(np.float64) for x in (p, m, v, g))
    g = g * scale
    if decay:
        p = p * (1 - lr * H.weight_decay)
    m = H.beta1 * m + (1 - H.beta1) * g
    v = H.beta2 * v + (1 - H.beta2) * g * g
    bc1, bc2 = 1 - H.beta1**t, 1 - H.beta2**t
    p = p - lr * np.sqrt(bc2) / bc1 * m / (np.sqrt(v) + H.eps * np.sqrt(bc2))
    return p, m, v


def test_matches_a_float64_reference_over_steps():
    rng = np.random.default_rng(0)
    n = 70_001  # several chunks and a ragged tail
    p = rng.standard_normal(n).astype(np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    rp, rm, rv = p.astype(np.float64), np.zeros(n), np.zeros(n)
    for t in range(1, 6):
        g = rng.standard_normal(n).astype(np.float32)
        adamw_update_(p, m, v, g, step_scalars(H, 1e-2, t, 0.5), decay=True)
        rp, rm, rv = _ref(rp, rm, rv, g, 1e-2, t, scale=0.5)
    np.testing.assert_allclose(p, rp, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(v, rv, rtol=2e-5, atol=1e-12)


def test_same_formula_as_paddle_adamw():
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((16, 8)).astype(np.float32)
    param = paddle.create_parameter([16, 8], "float32")
    param.set_value(w0)
    opt = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=[param], beta1=H.beta1, beta2=H.beta2, epsilon=H.eps, weight_decay=H.weight_decay)
    p, m, v = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
    for t in range(1, 4):
        g = rng.standard_normal(w0.shape).astype(np.float32)
        param.grad = paddle.to_tensor(g)
        opt.step()
        opt.clear_grad()
        adamw_update_(p, m, v, g, step_scalars(H, 1e-2, t), decay=True)
    np.testing.assert_allclose(p, param.numpy(), rtol=1e-5, atol=1e-6)


def test_none_gradient_scale_and_decay_flag():
    rng = np.random.default_rng(2)
    base = [rng.standard_normal(100).astype(np.float32) for _ in range(3)]
    base[2] = np.abs(base[2])
    g = rng.standard_normal(100).astype(np.float32)

    def run(grad, scale=1.0, decay=True):
        p, m, v = (x.copy() for x in base)
        adamw_update_(p, m, v, grad, step_scalars(H, 1e-3, 3, scale), decay=decay)
        return p, m, v

    np.testing.assert_array_equal(run(None)[0], run(np.zeros(100, np.float32))[0])
    np.testing.assert_array_equal(run(g, scale=0.25)[1], run(g * np.float32(0.25))[1])
    assert not np.array_equal(run(g, decay=False)[0], run(g)[0])
    p, m, v = (x.copy() for x in base)
    with pytest.raises(ValueError, match="sizes differ"):
        adamw_update_(p, m, v[:10], g, step_scalars(H, 1e-3, 1), decay=True)
    with pytest.raises(ValueError, match="must be >= 1"):
        step_scalars(H, 1e-3, 0)


def test_bit_identical_whatever_the_address_and_sq_sum_too():
    """Resident (views into a stack) and tiered (a slot at another offset) run on the same values."""
    rng = np.random.default_rng(3)
    n = 3 * 65536 + 123
    vals = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    vals[2] = np.abs(vals[2])
    a = [x.copy() for x in vals]
    big = np.zeros(4 * (n + 7) + 16, np.float32)
    b = [big[5 + i * (n + 7) : 5 + i * (n + 7) + n] for i in range(4)]  # odd float offsets
    for x, y in zip(b, vals):
        x[:] = y
    s = step_scalars(H, 3e-3, 7, 0.3)
    adamw_update_(a[0], a[1], a[2], a[3], s, decay=True)
    adamw_update_(b[0], b[1], b[2], b[3], s, decay=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert sq_sum(a[3]) == sq_sum(b[3])
    assert sq_sum(a[3]) == pytest.approx(float(np.sum(a[3].astype(np.float64) ** 2)), rel=1e-12)
    assert sq_sum(None) == 0.0
