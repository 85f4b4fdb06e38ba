"""semoe_grouped_ffn_int8 (weight-only int8 experts, GEMMs on the int8 weights) against the
float32 grouped FFN on the dequantized weights and a float64 NumPy reference."""

import numpy as np
import paddle
import pytest

from paddle_semoe import ops
from paddle_semoe.inference.package import quantize_int8
from tests._helpers import assert_close, assert_equal


def _int8_weights(E, D, F, seed=0):
    """(q1, s1, b1, q2, s2, b2) as NumPy arrays, quantized from random float32 weights."""
    rng = np.random.default_rng(seed)
    q1, s1 = quantize_int8((0.3 * rng.standard_normal((E, D, F))).astype(np.float32))
    q2, s2 = quantize_int8((0.3 * rng.standard_normal((E, F, D))).astype(np.float32))
    b1 = (0.1 * rng.standard_normal((E, F))).astype(np.float32)
    b2 = (0.1 * rng.standard_normal((E, D))).astype(np.float32)
    return q1, s1, b1, q2, s2, b2


def _tensors(arrays):
    return [paddle.to_tensor(a) for a in arrays]


def _numpy_reference(x, counts, q1, s1, b1, q2, s2, b2):
    """float64: relu((x @ q1) * s1 + b1) @ q2 * s2 + b2 per expert block, zeros past the rows."""
    out = np.zeros(x.shape, np.float64)
    off = 0
    for e, n in enumerate(counts):
        xe = x[off : off + n].astype(np.float64)
        h = np.maximum(xe @ q1[e].astype(np.float64) * s1[e] + b1[e], 0.0)
        out[off : off + n] = h @ q2[e].astype(np.float64) * s2[e] + b2[e]
        off += n
    return out


# D, F: multiples of the 64-column block and not (the tail path); row counts around the 4-row block
@pytest.mark.parametrize("D,F", [(64, 128), (40, 70), (130, 64)])
@pytest.mark.parametrize("counts,R", [([5, 0, 7, 3], 17), ([1, 1], 2), ([0, 0, 0], 4), ([9], 9), ([0, 0], 0)])
def test_matches_float64_reference(D, F, counts, R):
    w = _int8_weights(len(counts), D, F, seed=D + F + R)
    x = np.random.default_rng(1).standard_normal((R, D)).astype(np.float32)
    c = np.array(counts, np.int32)
    got = ops.grouped_ffn_int8(paddle.to_tensor(x), paddle.to_tensor(c), *_tensors(w), activation="relu",
                               backend="custom").numpy()
    ref = _numpy_reference(x, counts, *w)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max(initial=0.0))))
    assert not got[sum(counts):].any(), "rows past sum(counts) must be zero"


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_matches_float32_ffn_on_dequantized_weights(activation):
    """The served int8 model == the float32 op on ``q * scale`` (NumPy's dequantization), up to
    float32 rounding; the reference backend (which dequantizes in Paddle) agrees too."""
    E, D, F = 3, 96, 80
    q1, s1, b1, q2, s2, b2 = w = _int8_weights(E, D, F, seed=3)
    x = paddle.to_tensor(np.random.default_rng(4).standard_normal((14, D)).astype(np.float32))
    c = paddle.to_tensor(np.array([6, 0, 8], np.int32))
    dq = [q1 * s1[:, None, :], b1, q2 * s2[:, None, :], b2]
    assert dq[0].dtype == np.float32
    want = ops.grouped_ffn(x, c, *_tensors(dq), activation=activation, backend="custom")
    got = ops.grouped_ffn_int8(x, c, *_tensors(w), activation=activation, backend="custom")
    assert_close(got, want, rtol=1e-4, atol=1e-4, what=activation)
    fallback = ops.grouped_ffn_int8(x, c, *_tensors(w), activation=activation, backend="reference")
    assert_close(fallback, want, rtol=1e-4, atol=1e-4, what=f"{activation} reference backend")


def test_rows_are_batch_invariant_and_deterministic():
    """A row's output depends on that row only: bit-identical alone, among others, and run to run."""
    E, D, F = 4, 64, 192
    w = _tensors(_int8_weights(E, D, F, seed=7))
    x = np.random.default_rng(8).standard_normal((11, D)).astype(np.float32)
    c = paddle.to_tensor(np.array([3, 0, 6, 2], np.int32))
    full = ops.grouped_ffn_int8(paddle.to_tensor(x), c, *w, backend="custom")
    assert_equal(full, ops.grouped_ffn_int8(paddle.to_tensor(x), c, *w, backend="custom"))
    # row 4 belongs to expert 2 (rows 3..8): run it alone, then in a block of 4 rows with others
    alone = ops.grouped_ffn_int8(paddle.to_tensor(x[4:5]), paddle.to_tensor(np.array([0, 0, 1, 0], np.int32)), *w,
                                 backend="custom")
    assert_equal(alone[0], full[4])
    block = ops.grouped_ffn_int8(paddle.to_tensor(x[[0, 4, 5, 6, 7]]), paddle.to_tensor(np.array([1, 0, 4, 0], np.int32)),
                                 *w, backend="custom")
    assert_equal(block[1], full[4])


def test_errors_name_the_argument():
    q1, s1, b1, q2, s2, b2 = _tensors(_int8_weights(2, 4, 6))
    x = paddle.randn([5, 4])
    c = paddle.to_tensor([2, 3], dtype="int32")
    with pytest.raises(ValueError, match="'w1' must be paddle.int8"):
        ops.grouped_ffn_int8(x, c, q1.astype("float32"), s1, b1, q2, s2, b2)
    with pytest.raises(ValueError, match="'s2' must have shape"):
        ops.grouped_ffn_int8(x, c, q1, s1, b1, q2, s1, b2)
    with pytest.raises(ValueError, match="'s1' must be paddle.float32"):
        ops.grouped_ffn_int8(x, c, q1, s1.astype("float64"), b1, q2, s2, b2)
    with pytest.raises(ValueError, match="'w1' must have shape"):
        ops.grouped_ffn_int8(x, c, q2, s1, b1, q2, s2, b2)
    with pytest.raises(ValueError, match="unknown activation"):
        ops.grouped_ffn_int8(x, c, q1, s1, b1, q2, s2, b2, activation="tanh")
    with pytest.raises(Exception, match=r"sum\(counts\) = 9 exceeds the 5 rows"):
        ops.grouped_ffn_int8(x, paddle.to_tensor([4, 5], dtype="int32"), q1, s1, b1, q2, s2, b2, backend="custom")


# ----------------------------------------------------------------------------- int4
def _int4_weights(E, D, F, G, seed=0):
    """(packed w1, s1, b1, packed w2, s2, b2) from random float32 weights."""
    from paddle_semoe.inference.package import quantize_int4

    rng = np.random.default_rng(seed)
    q1, s1 = quantize_int4((0.3 * rng.standard_normal((E, D, F))).astype(np.float32), G)
    q2, s2 = quantize_int4((0.3 * rng.standard_normal((E, F, D))).astype(np.float32), G)
    b1 = (0.1 * rng.standard_normal((E, F))).astype(np.float32)
    b2 = (0.1 * rng.standard_normal((E, D))).astype(np.float32)
    return q1, s1, b1, q2, s2, b2


def test_int4_packing_round_trips_and_bounds_the_error():
    from paddle_semoe.inference.package import dequantize_int4, quantize_int4, unpack_int4

    w = (np.random.default_rng(0).standard_normal((3, 70, 10)) * np.linspace(0.1, 3, 10)).astype(np.float32)
    packed, scale = quantize_int4(w, 32)
    assert packed.shape == (3, 70, 5) and packed.dtype == np.uint8 and scale.shape == (3, 3, 10)
    q = unpack_int4(packed)
    assert q.min() >= -7 and q.max() <= 7 and (q == -7).any() and (q == 7).any()
    repacked = ((q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)).astype(np.uint8)
    np.testing.assert_array_equal(repacked, packed)
    step = np.repeat(scale, 32, axis=1)[:, :70]
    assert np.all(np.abs(dequantize_int4(packed, scale, 32) - w) <= step / 2 + 1e-6)
    with pytest.raises(ValueError, match="must be even"):
        quantize_int4(w[..., :9], 32)


def _numpy_reference_int4(x, counts, G, q1, s1, b1, q2, s2, b2):
    from paddle_semoe.inference.package import dequantize_int4

    d1 = dequantize_int4(q1, s1, G).astype(np.float64)
    d2 = dequantize_int4(q2, s2, G).astype(np.float64)
    out = np.zeros(x.shape, np.float64)
    off = 0
    for e, n in enumerate(counts):
        h = np.maximum(x[off : off + n].astype(np.float64) @ d1[e] + b1[e], 0.0)
        out[off : off + n] = h @ d2[e] + b2[e]
        off += n
    return out


# D, F: multiples of the 32-column block and not (the tail path); K not a multiple of G
@pytest.mark.parametrize("D,F,G", [(64, 128, 32), (40, 70, 32), (96, 34, 16)])
@pytest.mark.parametrize("counts,R", [([5, 0, 7, 3], 17), ([1, 1], 2), ([0, 0, 0], 4)])
def test_int4_matches_float64_reference(D, F, G, counts, R):
    w = _int4_weights(len(counts), D, F, G, seed=D + F + R)
    x = np.random.default_rng(1).standard_normal((R, D)).astype(np.float32)
    got = ops.grouped_ffn_int4(paddle.to_tensor(x), paddle.to_tensor(np.array(counts, np.int32)), *_tensors(w),
                               group_size=G, activation="relu", backend="custom").numpy()
    ref = _numpy_reference_int4(x, counts, G, *w)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max(initial=0.0))))
    assert not got[sum(counts):].any()


def test_int4_reference_backend_and_batch_invariance():
    E, D, F, G = 3, 64, 96, 32
    w = _tensors(_int4_weights(E, D, F, G, seed=5))
    x = np.random.default_rng(6).standard_normal((10, D)).astype(np.float32)
    c = paddle.to_tensor(np.array([4, 0, 6], np.int32))
    got = ops.grouped_ffn_int4(paddle.to_tensor(x), c, *w, group_size=G, activation="silu", backend="custom")
    ref = ops.grouped_ffn_int4(paddle.to_tensor(x), c, *w, group_size=G, activation="silu", backend="reference")
    assert_close(got, ref, rtol=1e-4, atol=1e-4)
    alone = ops.grouped_ffn_int4(paddle.to_tensor(x[5:6]), paddle.to_tensor(np.array([0, 0, 1], np.int32)), *w,
                                 group_size=G, activation="silu", backend="custom")
    assert_equal(alone[0], got[5])


def test_int4_errors_name_the_argument():
    q1, s1, b1, q2, s2, b2 = _tensors(_int4_weights(2, 4, 6, 2))
    x = paddle.randn([5, 4])
    c = paddle.to_tensor([2, 3], dtype="int32")
    with pytest.raises(ValueError, match="'w1' must be paddle.uint8"):
        ops.grouped_ffn_int4(x, c, q1.astype("int8"), s1, b1, q2, s2, b2, group_size=2)
    with pytest.raises(ValueError, match="'s1' must have shape"):
        ops.grouped_ffn_int4(x, c, q1, s1, b1, q2, s2, b2, group_size=4)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        ops.grouped_ffn_int4(x, c, q1, s1, b1, q2, s2, b2, group_size=0)
    with pytest.raises(Exception, match=r"sum\(counts\) = 9 exceeds the 5 rows"):
        ops.grouped_ffn_int4(x, paddle.to_tensor([4, 5], dtype="int32"), q1, s1, b1, q2, s2, b2, group_size=2,
                             backend="custom")
