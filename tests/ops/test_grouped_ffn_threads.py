"""semoe_grouped_ffn on 1 and 2 OpenMP threads against the sequential reference, at sizes that
reach every work split of the CPU kernel (custom_ops/include/semoe/grouped_ffn_cpu.h):

- forward: rows split in equal contiguous ranges across experts (a range may start or end
  inside an expert), or serial experts with multi-threaded GEMMs when there are few rows;
- backward: whole experts per thread (many experts), row slices per expert with partial
  gradients summed in slice order (few experts: the dense FFN), or serial experts;
- dW2 computed directly (F <= D) or as its transpose (F > D); tail rows past sum(counts).

The thread count of the kernel is fixed at process start, so each case runs in a child
process with OMP_NUM_THREADS set; the child compares against the reference and exits non-zero
with the failing case named.
"""

from __future__ import annotations

import pytest

from tests._helpers import run_child_on_threads

CHILD = r"""
import numpy as np
import paddle
from paddle_semoe import ops

CASES = [
    # (counts, R, D, F, activation)
    ([300], 300, 24, 40, "gelu"),            # dense FFN, F > D: slices, transposed dW2
    ([257], 261, 40, 24, "silu"),            # dense FFN, F <= D, tail rows, odd row count
    ([150, 0, 90], 250, 16, 48, "gelu_tanh"),  # two busy experts: slices, an empty expert
    ([3, 200], 203, 16, 32, "relu"),         # slices of a 3-row expert (one slice empty on 2 threads)
    ([40, 35, 0, 50, 33, 41, 29, 38, 44], 330, 16, 40, "gelu"),  # whole experts per thread
    ([7, 9, 0, 5], 30, 8, 24, "gelu"),       # few rows: serial experts
]


def run(backend, counts, R, D, F, act, seed):
    rng = np.random.default_rng(seed)
    E = len(counts)
    mk = lambda *s, sc=0.3: paddle.to_tensor((sc * rng.standard_normal(s)).astype("float32"))
    w = [mk(E, D, F), mk(E, F), mk(E, F, D), mk(E, D)]
    x = mk(R, D, sc=1.0)
    g = mk(R, D, sc=1.0)
    for t in [x, *w]:
        t.stop_gradient = False
    c = paddle.to_tensor(np.array(counts, np.int32))
    y = ops.grouped_ffn(x, c, *w, activation=act, backend=backend)
    (y * g).sum().backward()
    return [t.numpy() for t in [y, x.grad] + [p.grad for p in w]]


names = ["out", "grad x", "grad w1", "grad b1", "grad w2", "grad b2"]
for i, (counts, R, D, F, act) in enumerate(CASES):
    got = run("custom", counts, R, D, F, act, i)
    again = run("custom", counts, R, D, F, act, i)
    ref = run("reference", counts, R, D, F, act, i)
    for a, b, r, name in zip(got, again, ref, names):
        what = f"case {i} counts={counts} D={D} F={F} {act}: {name}"
        np.testing.assert_array_equal(a, b, err_msg=what + " (not deterministic)")
        np.testing.assert_allclose(a, r, rtol=2e-5, atol=2e-5, err_msg=what)
    assert not got[0][sum(counts):].any(), "rows past sum(counts) must be zero"
    assert not got[1][sum(counts):].any(), "grad x past sum(counts) must be zero"
    for e, n in enumerate(counts):
        if n == 0:
            assert not any(got[k][e].any() for k in (2, 3, 4, 5)), "an expert without rows gets zero grads"
print("ok", len(CASES))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_every_work_split_matches_reference(threads):
    run_child_on_threads(CHILD, threads, "ok 6")
