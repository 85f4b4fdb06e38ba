"""tools/gpu_check/reference.py on hand-computed tiny cases and finite differences."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from gpu_check import reference as ref  # noqa: E402


# ------------------------------------------------------------------------------ dtypes
def test_bf16_round_to_nearest_even():
    vals = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, 0.0, 3.14159], dtype=np.float32)
    bits = ref.bf16_bits(vals)
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even mantissa (1.0).
    assert bits.tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x0000, 0x4049]
    assert ref.bf16_values(np.array([0x4049], dtype=np.uint16))[0] == np.float32(3.140625)


def test_bf16_nan_and_inf():
    bits = ref.bf16_bits(np.array([np.nan, np.inf, -np.inf], dtype=np.float32))
    back = ref.bf16_values(bits)
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf


@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_encode_decode_roundtrip(dtype):
    v = np.array([[0.5, -1.25], [2.0, 0.0]], dtype=np.float32)  # exact in every dtype
    stored = ref.encode(v, dtype)
    assert stored.dtype == ref.STORAGE[dtype]
    np.testing.assert_array_equal(ref.decode(stored, dtype), v)


# ------------------------------------------------------------------------------ routing
def test_softmax_hand_case():
    p = ref.softmax(np.array([[0.0, math.log(2.0)], [5.0, 5.0]]))
    np.testing.assert_allclose(p, [[1 / 3, 2 / 3], [0.5, 0.5]], rtol=1e-15)


def test_top_k_descending_ties_to_lower_index():
    probs = np.array([[0.25, 0.25, 0.5], [0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3]], dtype=np.float32)
    np.testing.assert_array_equal(ref.top_k(probs, 2), [[2, 0], [1, 2], [0, 1]])
    np.testing.assert_array_equal(ref.top_k(probs, 3)[2], [0, 1, 2])


def test_random_routing_threshold_is_inclusive():
    # p0 = 0.6, p1 = 0.2: threshold 2 * 0.2 / 0.8 = 0.5; dropped when noise >= 0.5.
    probs = np.array([[0.6, 0.2, 0.2]] * 3, dtype=np.float32)
    ids = np.array([[0, 1]] * 3, dtype=np.int32)
    thr = np.float32(2.0) * np.float32(0.2) / (np.float32(0.6) + np.float32(0.2))
    noise = np.array([np.nextafter(thr, np.float32(0)), thr, 0.9], dtype=np.float32)
    keep = ref.random_routing_keep(probs, ids, noise)
    assert keep.tolist() == [[True, True], [True, False], [True, False]]
    assert ref.random_routing_keep(probs, ids, None).all()
    assert ref.random_routing_keep(probs[:, :1], ids[:, :1], noise).all()  # K = 1: never


def test_capacity_and_rows():
    assert ref.expert_capacity(10, 4, 2, 1.0) == 5
    assert ref.expert_capacity(10, 4, 2, 1.01) == 6
    assert ref.expert_capacity(10, 4, 2, 0.0) == 0
    assert ref.expert_capacity(10, 4, 2, 0.1) == 1  # exact: 0.1 * 20 / 4 = 0.5 -> 1
    assert ref.expert_capacity(40, 8, 2, 0.1) == 1  # exactly 1.0, no float rounding up to 2
    assert ref.expert_capacity(0, 4, 2, 1.0) == 0
    assert ref.dispatch_rows(4, 3, 2, 2) == 6
    assert ref.dispatch_rows(4, 3, 2, 0) == 8
    assert ref.dispatch_rows(4, 3, 2, 5) == 8


def test_assign_positions_hand_case():
    # Token-major visit order a = t*K + j. Capacity 2:
    #   a0 e0 r0 | a1 e1 r0 | a2 e0 r1 | a3 e2 r0 | a4 e0 r2 drop | a5 e1 r1 | a6 e1 r2 drop
    #   a7 e0 r3 drop.  counts = [2, 2, 1], offsets = [0, 2, 4].
    ids = np.array([[0, 1], [0, 2], [0, 1], [1, 0]], dtype=np.int32)
    ones = np.ones_like(ids, dtype=bool)
    pos, counts = ref.assign_positions(ids, ones, 3, 2, rule="token")
    assert counts.tolist() == [2, 2, 1]
    assert pos.tolist() == [[0, 2], [1, 4], [-1, 3], [-1, -1]]
    # Choice-major (the default): first choices t0 e0 r0, t1 e0 r1, t2 e0 r2 drop, t3 e1 r0;
    # second choices t0 e1 r1, t1 e2 r0, t2 e1 r2 drop, t3 e0 r2 drop.
    pos, counts = ref.assign_positions(ids, ones, 3, 2)
    assert counts.tolist() == [2, 2, 1]
    assert pos.tolist() == [[0, 3], [1, 4], [-1, -1], [2, -1]]
    # Dropped by random routing: not counted, later ones move up.
    keep = np.array([[True, False], [True, True], [True, True], [True, True]])
    pos, counts = ref.assign_positions(ids, keep, 3, 2, rule="token")
    assert counts.tolist() == [2, 2, 1]
    assert pos.tolist() == [[0, -1], [1, 4], [-1, 2], [3, -1]]
    # Dropless keeps everything, expert-major (choice-major inside each expert).
    pos, counts = ref.assign_positions(ids, ones, 3, 0)
    assert counts.tolist() == [4, 3, 1]
    assert pos.tolist() == [[0, 5], [1, 7], [2, 6], [4, 3]]


def test_visit_orders_hand_case():
    ids = np.array([[0, 1], [1, 0], [0, 1]], dtype=np.int32)
    probs = np.array([[0.5, 0.3], [0.4, 0.6], [0.9, 0.1]], dtype=np.float32)
    assert ref.visit_order(ids, probs, "token").tolist() == [0, 1, 2, 3, 4, 5]
    assert ref.visit_order(ids, probs, "choice").tolist() == [0, 2, 4, 1, 3, 5]
    # BPR: top probabilities 0.5, 0.6, 0.9 -> tokens 2, 1, 0
    assert ref.visit_order(ids, probs, "choice", True).tolist() == [4, 2, 0, 5, 3, 1]
    assert ref.visit_order(ids, probs, "token", True).tolist() == [4, 5, 2, 3, 0, 1]
    # probs: selected probs [0.5, 0.3, 0.6, 0.4, 0.9, 0.1] descending
    assert ref.visit_order(ids, probs, "probs").tolist() == [4, 2, 0, 3, 1, 5]
    tied = np.full((3, 2), 0.5, dtype=np.float32)
    assert ref.visit_order(ids, tied, "probs").tolist() == [0, 1, 2, 3, 4, 5]  # ties by index
    assert ref.visit_order(ids, tied, "choice", True).tolist() == [0, 2, 4, 1, 3, 5]


def test_gather_rows_and_zero_tail():
    x = np.array([[1, 2], [3, 4]], dtype=np.float32)
    rows = ref.gather_rows(x, np.array([[2, -1], [0, 1]]), 4)
    np.testing.assert_array_equal(rows, [[3, 4], [3, 4], [1, 2], [0, 0]])


def test_gate_dispatch_end_to_end_small():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [2.0, 0.0, 1.0]], dtype=np.float32)
    d = ref.gate_dispatch(x, logits, None, 2, 1.0, True)  # capacity ceil(3*2/3) = 2
    assert d.ids.tolist() == [[0, 1], [1, 2], [0, 2]]
    assert d.counts.tolist() == [2, 2, 2]
    # choice-major: e0 gets t0, t2 (first choices); e1 gets t1 (first), then t0 (second)
    assert d.pos.tolist() == [[0, 3], [2, 4], [1, 5]]
    np.testing.assert_allclose(d.weights.sum(axis=1), 1.0)
    np.testing.assert_array_equal(d.rows, x[[0, 2, 1, 0, 1, 2]])


def test_combine_and_grad_hand_case():
    rows = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    w = np.array([[0.5, 2.0]])
    pos = np.array([[2, 0]])
    np.testing.assert_allclose(ref.combine(rows, w, pos), [[4.5, 7.0]])
    g = np.array([[1.0, -1.0]])
    grad_rows, grad_w = ref.combine_grad(rows, w, pos, g, 3)
    np.testing.assert_allclose(grad_rows, [[2.0, -2.0], [0.0, 0.0], [0.5, -0.5]])
    np.testing.assert_allclose(grad_w, [[5.0 - 6.0, 1.0 - 2.0]])
    # A dropped assignment contributes nothing and gets a zero weight gradient.
    np.testing.assert_allclose(ref.combine(rows, w, np.array([[-1, 0]])), [[2.0, 4.0]])
    assert ref.combine_grad(rows, w, np.array([[-1, 0]]), g, 3)[1].tolist() == [[0.0, -1.0]]


def test_gate_dispatch_grad_hand_cases():
    probs = np.array([[0.25, 0.75]])
    ids = np.array([[1]])
    pos = np.array([[0]])
    # K = 1 normalized: the weight is identically 1, so no gradient reaches the logits.
    _, gl = ref.gate_dispatch_grad(probs, [[1.0]], ids, pos, None, [[2.0]], None, True, 1)
    np.testing.assert_allclose(gl, [[0.0, 0.0]], atol=1e-15)
    # Not normalized: gp = [0, 2], s = 1.5, grad_logits = p * (gp - s).
    _, gl = ref.gate_dispatch_grad(probs, [[0.75]], ids, pos, None, [[2.0]], None, False, 1)
    np.testing.assert_allclose(gl, [[-0.375, 0.375]])
    # grad_x sums the kept copies.
    gx, _ = ref.gate_dispatch_grad(np.array([[0.5, 0.5]]), [[0.5, 0.5]], np.array([[0, 1]]),
                                   np.array([[1, -1]]), np.array([[1.0], [10.0]]), None, None,
                                   True, 1)
    np.testing.assert_allclose(gx, [[10.0]])


@pytest.mark.parametrize("normalize", [True, False])
def test_gate_dispatch_grad_matches_finite_differences(normalize):
    rng = np.random.default_rng(0)
    T, E, K = 3, 5, 2
    logits = rng.standard_normal((T, E))
    gw = rng.standard_normal((T, K))
    gp = rng.standard_normal((T, E))

    def loss(z):
        p = ref.softmax(z)
        ids = ref.top_k(p, K)
        sel = np.take_along_axis(p, ids.astype(np.int64), axis=1)
        w = sel / sel.sum(axis=1, keepdims=True) if normalize else sel
        return float((w * gw).sum() + (p * gp).sum())

    p = ref.softmax(logits)
    ids = ref.top_k(p, K)
    sel = np.take_along_axis(p, ids.astype(np.int64), axis=1)
    w = sel / sel.sum(axis=1, keepdims=True) if normalize else sel
    _, gl = ref.gate_dispatch_grad(p, w, ids, np.zeros((T, K), int), None, gw, gp, normalize, 1)
    num = np.zeros_like(logits)
    h = 1e-6
    for i in np.ndindex(*logits.shape):
        zp, zm = logits.copy(), logits.copy()
        zp[i] += h
        zm[i] -= h
        num[i] = (loss(zp) - loss(zm)) / (2 * h)
    np.testing.assert_allclose(gl, num, rtol=1e-5, atol=1e-7)


def test_expert_count_ignores_out_of_range():
    assert ref.expert_count(np.array([0, 2, 2, -1, 3, 5, 1]), 3).tolist() == [1, 1, 2]
    assert ref.expert_count(np.array([], dtype=np.int32), 2).tolist() == [0, 0]


# ------------------------------------------------------------------------------ activations
def test_activation_values():
    h = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_allclose(ref.activation(h, "relu"), [0.0, 0.0, 2.0])
    np.testing.assert_allclose(ref.activation(h, "silu"), h / (1 + np.exp(-h)))
    np.testing.assert_allclose(ref.activation([0.0, 10.0], "gelu"), [0.0, 10.0], atol=1e-12)
    np.testing.assert_allclose(ref.activation([1.0], "gelu"), [0.8413447460685429])
    np.testing.assert_allclose(ref.activation([1.0], "gelu_tanh"), [0.8411919906082768])
    np.testing.assert_allclose(ref.activation_grad([0.0], "gelu"), [0.5])
    np.testing.assert_allclose(ref.activation_grad([0.0], "silu"), [0.5])
    with pytest.raises(ValueError, match="unknown activation"):
        ref.activation(h, "tanh")


@pytest.mark.parametrize("name", ref.ACTIVATIONS)
def test_activation_grad_matches_finite_differences(name):
    h = np.array([-3.0, -0.7, 0.3, 1.9, 4.0])
    eps = 1e-6
    num = (ref.activation(h + eps, name) - ref.activation(h - eps, name)) / (2 * eps)
    np.testing.assert_allclose(ref.activation_grad(h, name), num, rtol=1e-6, atol=1e-8)


def test_row_experts_and_bias_act():
    assert ref.row_experts([2, 0, 1], 5).tolist() == [0, 0, 2, -1, -1]
    assert ref.row_experts([3, 3], 4).tolist() == [0, 0, 0, 1]
    h = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    bias = np.array([[10.0], [20.0]], dtype=np.float32)
    h_new, a = ref.bias_act(h, bias, [1, 1], "relu", "float32")
    np.testing.assert_array_equal(h_new, [[11.0], [22.0], [3.0]])  # last row: no expert
    np.testing.assert_array_equal(a, [[11.0], [22.0], [3.0]])


# ------------------------------------------------------------------------------ fused all-to-all
def test_a2a_reference_on_a_hand_computed_case():
    # El = 1, P = 2: rank 0 sends rows a0 (expert 0), a1 a2 (expert 1); rank 1 sends b0 (expert 1)
    C = np.array([[1, 2], [0, 1]])
    rows = [np.array([[10], [11], [12]]), np.array([[20]])]
    local = ref.a2a_dispatch(rows, C, 1)
    assert local[0].ravel().tolist() == [10]
    assert local[1].ravel().tolist() == [11, 12, 20]  # expert 1: source 0's rows, then source 1's
    back = ref.a2a_combine(local, C, 1, [4, 1])
    assert back[0].ravel().tolist() == [10, 11, 12, 0] and back[1].ravel().tolist() == [20]


@pytest.mark.parametrize("P, El", [(1, 3), (3, 2), (4, 1)])
def test_a2a_reference_combine_inverts_dispatch(P, El):
    rng = np.random.default_rng(P + El)
    C = rng.integers(0, 4, size=(P, P * El))
    rows = [rng.standard_normal((int(C[s].sum()), 2)) for s in range(P)]
    local = ref.a2a_dispatch(rows, C, El)
    assert [x.shape[0] for x in local] == [int(C[:, d * El:(d + 1) * El].sum()) for d in range(P)]
    back = ref.a2a_combine(local, C, El, [x.shape[0] + 1 for x in rows])
    for s in range(P):
        np.testing.assert_array_equal(back[s][:-1], rows[s])
        assert not back[s][-1].any()


def test_permute_row_blocks_reference():
    x = np.arange(10).reshape(5, 2)
    out = ref.permute_row_blocks(x, np.array([3, 0]), np.array([1, 3, 4]), np.full((5, 2), -1))
    assert out.tolist() == [[-1, -1], [6, 7], [8, 9], [0, 1], [-1, -1]]

