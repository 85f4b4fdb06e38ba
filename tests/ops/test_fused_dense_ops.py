"""Fused dense-model ops (linear, LayerNorm, residual + LayerNorm, softmax cross-entropy)
against their pure-Paddle references, forward and every gradient.

Tolerances (float32): the kernels sum in a different order than Paddle's (oneDNN blocking,
fixed row blocks) and use polynomial exp/erf (activation.h: erf < 1.5e-7 absolute), so
results agree to ~1e-6 relative; the asserts allow rtol = atol = 2e-5 (1e-4 for gelu_tanh,
whose derivative is assembled from more rounded terms).
"""

import numpy as np
import paddle
import pytest

from paddle_semoe import ops
from tests._helpers import assert_close, assert_equal


def _rand(rng, *shape, scale=1.0):
    return paddle.to_tensor((scale * rng.standard_normal(shape)).astype("float32"))


def _run(fn, inputs, grad_outs, backend):
    """Outputs and input gradients of fn(*inputs, backend=backend) under upstream grads."""
    xs = [t.clone() for t in inputs]
    for t in xs:
        t.stop_gradient = False
    outs = fn(*xs, backend=backend)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if any(int(np.prod(o.shape)) for o in outs):
        paddle.autograd.backward(outs, grad_outs)
    return outs, [t.grad for t in xs]


def _compare(fn, inputs, grad_outs, tol, what):
    got_o, got_g = _run(fn, inputs, grad_outs, "custom")
    ref_o, ref_g = _run(fn, inputs, grad_outs, "reference")
    for i, (a, b) in enumerate(zip(got_o, ref_o)):
        assert_close(a, b, rtol=tol, atol=tol, what=f"{what} out{i}")
    for i, (a, b) in enumerate(zip(got_g, ref_g)):
        if b is None:
            assert a is None or not a.numpy().any(), f"{what} grad{i}"
            continue
        assert_close(a, b, rtol=tol, atol=tol, what=f"{what} grad{i}")


# ----------------------------------------------------------------------------- linear
@pytest.mark.parametrize("activation", ops.LINEAR_ACTIVATIONS)
@pytest.mark.parametrize("trans_w", [False, True])
@pytest.mark.parametrize("lead,K,N", [((3, 5), 7, 9), ((1,), 1, 1), ((0,), 4, 6), ((2, 1), 33, 17)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(activation, trans_w, lead, K, N, bias):
    rng = np.random.default_rng(K * 100 + N)
    x = _rand(rng, *lead, K)
    w = _rand(rng, *((N, K) if trans_w else (K, N)), scale=0.3)
    inputs = [x, w] + ([_rand(rng, N)] if bias else [])
    g = _rand(rng, *lead, N)

    def fn(x, w, b=None, backend=None):
        return ops.fused_linear(x, w, b, activation=activation, trans_w=trans_w, backend=backend)

    tol = 1e-4 if activation == "gelu_tanh" else 2e-5
    _compare(fn, inputs, [g], tol, f"linear {activation} trans_w={trans_w} {lead}x{K}->{N}")


def test_linear_is_deterministic():
    x, w, b = paddle.randn([64, 48]), paddle.randn([48, 80]), paddle.randn([80])
    assert_equal(ops.fused_linear(x, w, b, activation="gelu"), ops.fused_linear(x, w, b, activation="gelu"))


def test_linear_errors_name_the_argument():
    x, w = paddle.randn([4, 8]), paddle.randn([8, 3])
    with pytest.raises(ValueError, match="'x' must be float32"):
        ops.fused_linear(x.astype("float64"), w)
    with pytest.raises(ValueError, match="'w'"):
        ops.fused_linear(x, paddle.randn([5, 3]))
    with pytest.raises(ValueError, match="'b' must have shape"):
        ops.fused_linear(x, w, paddle.randn([4]))
    with pytest.raises(ValueError, match="unknown activation"):
        ops.fused_linear(x, w, activation="tanh")


# ----------------------------------------------------------------------------- layer norm
@pytest.mark.parametrize("shape", [(4, 6, 33), (1, 1, 8), (0, 16), (3, 1)])
def test_layer_norm_matches_reference(shape):
    rng = np.random.default_rng(len(shape))
    D = shape[-1]
    inputs = [_rand(rng, *shape, scale=3.0), _rand(rng, D), _rand(rng, D)]

    def fn(x, gamma, beta, backend=None):
        return ops.layer_norm(x, gamma, beta, epsilon=1e-5, backend=backend)

    _compare(fn, inputs, [_rand(rng, *shape)], 2e-5, f"layer_norm {shape}")


@pytest.mark.parametrize("shape", [(4, 6, 33), (2, 1, 128), (0, 16)])
@pytest.mark.parametrize("use_sum", [True, False])
def test_add_layer_norm_matches_reference(shape, use_sum):
    rng = np.random.default_rng(7)
    D = shape[-1]
    inputs = [_rand(rng, *shape), _rand(rng, *shape), _rand(rng, D), _rand(rng, D)]

    def fn(x, r, gamma, beta, backend=None):
        out, s = ops.add_layer_norm(x, r, gamma, beta, epsilon=1e-5, backend=backend)
        return (out, s) if use_sum else (out,)

    grads = [_rand(rng, *shape)] + ([_rand(rng, *shape)] if use_sum else [])
    _compare(fn, inputs, grads, 2e-5, f"add_layer_norm {shape} sum_used={use_sum}")


def test_layer_norm_errors_name_the_argument():
    x = paddle.randn([4, 8])
    with pytest.raises(ValueError, match="'gamma' must have shape"):
        ops.layer_norm(x, paddle.ones([7]), paddle.zeros([8]))
    with pytest.raises(ValueError, match="'x' must be float32"):
        ops.layer_norm(x.astype("float16"), paddle.ones([8]), paddle.zeros([8]))
    with pytest.raises(ValueError, match="'residual'"):
        ops.add_layer_norm(x, paddle.randn([4, 7]), paddle.ones([8]), paddle.zeros([8]))


# ----------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("T,V,ignored", [(50, 17, [3, 10]), (1, 256, []), (6, 5, [0, 1, 2, 3, 4, 5]), (0, 9, [])])
def test_softmax_cross_entropy_matches_reference(T, V, ignored):
    rng = np.random.default_rng(T + V)
    logits = _rand(rng, T, V, scale=4.0)
    labels = rng.integers(0, V, size=T).astype("int64")
    labels[ignored] = -100
    y = paddle.to_tensor(labels)

    def fn(z, backend=None):
        return ops.softmax_cross_entropy(z, y, ignore_index=-100, backend=backend)

    _compare(fn, [logits], [paddle.to_tensor(1.7)], 2e-5, f"softmax_ce T={T} V={V}")


def test_softmax_cross_entropy_equals_paddle_mean_when_nothing_is_ignored():
    z, y = paddle.randn([40, 30]), paddle.randint(0, 30, [40])
    want = paddle.nn.functional.cross_entropy(z, y)
    assert_close(ops.softmax_cross_entropy(z, y), want, rtol=1e-6, atol=1e-6)


def test_softmax_cross_entropy_bad_label_is_a_clear_error():
    z = paddle.randn([4, 5])
    with pytest.raises(ValueError, match="'labels' must be"):
        ops.softmax_cross_entropy(z, paddle.to_tensor([0, 1, 2, 3], dtype="int32"))
    with pytest.raises(Exception, match=r"labels\[2\] = 7 is outside"):
        ops.softmax_cross_entropy(z, paddle.to_tensor([0, 1, 7, 3]), backend="custom")


# ----------------------------------------------------------------------------- bfloat16 GEMMs
def test_bfloat16_gemms_round_the_operands_and_float32_comes_back():
    """Under bfloat16 a GEMM equals the float32 GEMM of bf16-rounded operands (accumulation
    stays float32), the expert FFN follows the same switch, and float32 is restored after."""
    from paddle_semoe.engine.amp import cpu_gemm_precision

    rng = np.random.default_rng(0)
    x, w, b = _rand(rng, 64, 96), _rand(rng, 96, 80, scale=0.2), _rand(rng, 80)
    ref = ops.fused_linear(x, w, b)
    with cpu_gemm_precision("bfloat16") as got:
        assert got == "bfloat16"
        y = ops.fused_linear(x, w, b)
        counts = paddle.to_tensor([40, 24], dtype="int32")
        ffn = [_rand(rng, 2, 96, 32, scale=0.2), _rand(rng, 2, 32), _rand(rng, 2, 32, 96, scale=0.2), _rand(rng, 2, 96)]
        ffn_bf16 = ops.grouped_ffn(x, counts, *ffn)
    rounded = lambda t: t.astype("bfloat16").astype("float32")  # noqa: E731
    assert_close(y, ops.fused_linear(rounded(x), rounded(w), b), rtol=1e-5, atol=1e-5, what="bf16 operands")
    assert np.abs(y.numpy() - ref.numpy()).max() > 0, "bfloat16 GEMMs must differ from float32"
    assert_close(y, ref, rtol=2e-2, atol=2e-2, what="bf16 near float32")
    assert_close(ffn_bf16, ops.grouped_ffn(x, counts, *ffn), rtol=3e-2, atol=3e-2, what="expert FFN in bf16")
    assert_equal(ops.fused_linear(x, w, b), ref, what="float32 restored")
    with pytest.raises(ValueError, match="precision must be one of"):
        ops.set_cpu_gemm_precision("float16")


def test_bfloat16_ffn_mode_keeps_the_linear_layers_float32():
    from paddle_semoe.engine.amp import cpu_gemm_precision

    rng = np.random.default_rng(1)
    x, w = _rand(rng, 32, 64), _rand(rng, 64, 48, scale=0.2)
    counts = paddle.to_tensor([32], dtype="int32")
    ffn = [_rand(rng, 1, 64, 16, scale=0.2), _rand(rng, 1, 16), _rand(rng, 1, 16, 64, scale=0.2), _rand(rng, 1, 64)]
    lin_ref, ffn_ref = ops.fused_linear(x, w), ops.grouped_ffn(x, counts, *ffn)
    with cpu_gemm_precision("bfloat16_ffn") as got:
        assert got == "bfloat16_ffn"
        lin, out = ops.fused_linear(x, w), ops.grouped_ffn(x, counts, *ffn)
    assert_equal(lin, lin_ref, what="linear stays float32")
    assert np.abs(out.numpy() - ffn_ref.numpy()).max() > 0, "the FFN GEMMs run in bfloat16"
    assert_close(out, ffn_ref, rtol=3e-2, atol=3e-2)
