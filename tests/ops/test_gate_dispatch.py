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


def _numpy_visit(probs, ids, rule, batch_priority):
    """Independent NumPy model of the capacity priority order: a list of (t, j) pairs."""
    T, K = ids.shape
    if rule == "probs":  # highest router probability first, ties by token index
        return sorted(((t, j) for t in range(T) for j in range(K)), key=lambda tj: (-probs[tj[0], ids[tj]], tj[0]))
    toks = list(range(T))
    if batch_priority:  # V-MoE BPR: tokens by top probability, descending, ties by index
        toks.sort(key=lambda t: (-probs[t, ids[t, 0]], t))
    if rule == "choice":
        return [(t, j) for j in range(K) for t in toks]
    return [(t, j) for t in toks for j in range(K)]


def _numpy_positions(ids, keep, E, cap, probs=None, rule="choice", batch_priority=False):
    """Independent NumPy model of the contract's steps 6-7 (slots given in visit order)."""
    T, K = ids.shape
    fill = np.zeros(E, np.int64)
    rank = np.full((T, K), -1, np.int64)
    for t, j in _numpy_visit(probs, ids, rule, batch_priority):
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


RULES = [("choice", False), ("token", False), ("probs", False), ("choice", True), ("token", True)]


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

    # independent NumPy model of ranks/positions/rows (default rule: choice-major)
    ids = got.ids.numpy()
    pos, counts = _numpy_positions(ids, np.ones_like(ids, bool), E, cap, got.probs.numpy())
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
    z = paddle.zeros([0])

    def call(x_, k=2, rule=0, bpr=False, mc=0, fn=0, bias=z):
        return lib.semoe_gate_dispatch(x_, paddle.randn([4, 3]), z, bias, k, 10**6, True, rule, bpr, mc, fn)

    with pytest.raises(Exception, match="argument 'x' must be float32"):
        call(x)
    with pytest.raises(Exception, match="top_k must be in"):
        call(paddle.randn([4, 8]), k=9)
    with pytest.raises(Exception, match="capacity_rule must be"):
        call(paddle.randn([4, 8]), rule=3)
    with pytest.raises(Exception, match="cannot be combined"):
        call(paddle.randn([4, 8]), rule=2, bpr=True)
    with pytest.raises(Exception, match="min_capacity must be >= 0"):
        call(paddle.randn([4, 8]), mc=-1)
    with pytest.raises(Exception, match="score_fn must be 0"):
        call(paddle.randn([4, 8]), fn=2)
    with pytest.raises(Exception, match="'select_bias' must have shape"):
        call(paddle.randn([4, 8]), bias=paddle.zeros([5]))


# ------------------------------------------------------------------ capacity priority rules
def _dispatch_both(x, logits, **kw):
    got = ops.gate_dispatch(x, logits, backend="custom", **kw)
    ref = ops.gate_dispatch(x, logits, backend="reference", **kw)
    for name in ("ids", "positions", "counts", "rows"):
        assert_equal(getattr(got, name), getattr(ref, name), f"{name} custom vs reference ({kw})")
    assert_close(got.weights, ref.weights, what="weights")
    return got


def test_choice_major_vs_token_major_hand_case():
    # E=3, K=2, capacity ceil(0.5 * 3 * 2 / 3) = 1. First choices e0, e1, e2; second e1, e0, e1.
    logits = paddle.to_tensor([[3.0, 2.0, 0.0], [2.0, 3.0, 0.0], [0.0, 2.0, 3.0]])
    x = paddle.to_tensor([[1.0], [2.0], [3.0]])
    kw = dict(top_k=2, capacity_factor=0.5, normalize=True)
    c = _dispatch_both(x, logits, capacity_rule="choice", **kw)
    t = _dispatch_both(x, logits, capacity_rule="token", **kw)
    # choice-major: every first choice keeps its slot; no second choice fits
    assert c.positions.numpy().tolist() == [[0, -1], [1, -1], [2, -1]]
    # token-major: token 0's second choice (e1) takes the slot of token 1's first choice
    assert t.positions.numpy().tolist() == [[0, 1], [-1, -1], [2, -1]]
    assert c.rows.numpy()[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert t.rows.numpy()[:, 0].tolist() == [1.0, 1.0, 3.0]  # e0 and e1 both hold token 0


def test_probs_policy_keeps_highest_probability_hand_case():
    # all 4 tokens pick expert 0 (K=1), capacity ceil(1.0 * 4 / 2) = 2; probabilities of e0
    # rank t1 > t2 == t3 > t0: probs keeps t1 and t2 (the tie goes to the lower token index)
    logits = paddle.to_tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    x = paddle.arange(4, dtype="float32").reshape([4, 1])
    kw = dict(top_k=1, capacity_factor=1.0, normalize=False)
    p = _dispatch_both(x, logits, capacity_rule="probs", **kw)
    c = _dispatch_both(x, logits, capacity_rule="choice", **kw)
    # slots in priority order: t1 first, then t2
    assert p.positions.numpy().ravel().tolist() == [-1, 0, 1, -1]
    assert p.rows.numpy()[:2, 0].tolist() == [1.0, 2.0]
    assert c.positions.numpy().ravel().tolist() == [0, 1, -1, -1]


def test_batch_priority_hand_case():
    # E=3, K=2, capacity 1. Token 0 is unsure (top prob low), token 1 is sure: both want e0 first.
    logits = paddle.to_tensor([[1.0, 0.9, 0.0], [6.0, 0.0, 1.0], [0.0, 3.0, 0.5]])
    x = paddle.to_tensor([[1.0], [2.0], [3.0]])
    kw = dict(top_k=2, capacity_factor=0.5, normalize=True)
    plain = _dispatch_both(x, logits, capacity_rule="choice", **kw)
    bpr = _dispatch_both(x, logits, capacity_rule="choice", batch_priority=True, **kw)
    # order by top prob: t1 (0.99), t2, t0. First choices: t1->e0, t2->e1, t0->e0 (full).
    # second choices: t1->e2 (free), t2->e2 (full), t0->e1 (full).
    assert bpr.positions.numpy().tolist() == [[-1, -1], [0, 2], [1, -1]]
    # without BPR token 0 gets e0 and token 1 loses its first choice
    assert plain.positions.numpy().tolist() == [[0, -1], [-1, 2], [1, -1]]
    tok = _dispatch_both(x, logits, capacity_rule="token", batch_priority=True, **kw)
    # token-major with BPR: t1 takes e0 and e2, t2 takes e1 (e2 full), t0 gets nothing
    assert tok.positions.numpy().tolist() == [[-1, -1], [0, 2], [1, -1]]


def test_min_capacity_floors_the_capacity():
    assert ops.expert_capacity(4, 4, 1, 0.25) == 1
    assert ops.expert_capacity(4, 4, 1, 0.25, min_capacity=3) == 3
    assert ops.expert_capacity(4, 4, 1, 2.0, min_capacity=1) == 2  # a floor, not a cap
    assert ops.expert_capacity(4, 4, 1, 0.0, min_capacity=3) == 0  # dropless stays dropless
    logits = paddle.to_tensor(np.tile([[2.0, 0.0, 0.0, 0.0]], (4, 1)).astype("float32"))
    x = paddle.arange(4, dtype="float32").reshape([4, 1])
    for mc, kept in ((0, 1), (3, 3)):
        r = _dispatch_both(x, logits, top_k=1, capacity_factor=0.25, normalize=False, min_capacity=mc)
        assert r.counts.numpy().tolist() == [kept, 0, 0, 0]
        assert r.rows.shape == [ops.dispatch_rows(4, 4, 1, max(1, mc)), 1]
    with pytest.raises(ValueError, match="min_capacity must be >= 0"):
        ops.gate_dispatch(x, logits, top_k=1, capacity_factor=1.0, normalize=False, min_capacity=-1)


def test_bad_capacity_rule():
    x, logits = _inputs(4, 8, 3)
    with pytest.raises(ValueError, match="capacity rule must be one of"):
        ops.gate_dispatch(x, logits, top_k=2, capacity_factor=1.0, normalize=True, capacity_rule="expert")
    with pytest.raises(ValueError, match="cannot be combined"):
        ops.gate_dispatch(x, logits, top_k=2, capacity_factor=1.0, normalize=True, capacity_rule="probs", batch_priority=True)


RULE_CASES = [
    # T, E, K, capacity_factor, min_capacity, noise
    (96, 8, 2, 1.0, 0, False),
    (64, 6, 3, 0.5, 0, False),
    (80, 4, 2, 0.75, 0, True),
    (30, 5, 1, 0.3, 4, False),
    (50, 8, 8, 1.0, 0, False),  # k = E
]


@pytest.mark.parametrize("rule,bpr", RULES)
@pytest.mark.parametrize("T,E,K,cf,mc,noisy", RULE_CASES)
def test_rules_match_numpy_and_reference(rule, bpr, T, E, K, cf, mc, noisy):
    x, logits = _inputs(T, 6, E, seed=T * 7 + E)
    noise = paddle.to_tensor(np.random.default_rng(T).random(T).astype("float32")) if noisy else None
    got = _dispatch_both(
        x, logits, top_k=K, capacity_factor=cf, normalize=True, noise=noise,
        capacity_rule=rule, batch_priority=bpr, min_capacity=mc,
    )
    ids, probs = got.ids.numpy(), got.probs.numpy()
    keep = np.ones_like(ids, bool)
    if noisy and K >= 2:
        sel = np.take_along_axis(probs, ids, 1)
        keep[:, 1:] = ~(noise.numpy()[:, None] >= 2 * sel[:, 1:] / (sel[:, :1] + sel[:, 1:]))
    cap = ops.expert_capacity(T, E, K, cf, mc)
    pos, counts = _numpy_positions(ids, keep, E, cap, probs, rule, bpr)
    assert_equal(got.positions, pos, f"positions vs numpy ({rule}, bpr={bpr})")
    assert_equal(got.counts, counts, "counts vs numpy")
    rows, xn = got.rows.numpy(), x.numpy()
    for t, j in zip(*np.nonzero(pos >= 0)):
        np.testing.assert_array_equal(rows[pos[t, j]], xn[t])
    assert not rows[counts.sum():].any()


@pytest.mark.parametrize("rule,bpr", RULES)
def test_rules_gradients_match_reference(rule, bpr):
    x0, l0 = _inputs(48, 8, 6, seed=21)
    grads = {}
    for backend in ("custom", "reference"):
        x, logits = x0.clone(), l0.clone()
        x.stop_gradient = logits.stop_gradient = False
        r = ops.gate_dispatch(x, logits, top_k=2, capacity_factor=0.75, normalize=True,
                              capacity_rule=rule, batch_priority=bpr, backend=backend)
        rng = np.random.default_rng(5)
        g_rows = paddle.to_tensor(rng.standard_normal(r.rows.shape).astype("float32"))
        g_w = paddle.to_tensor(rng.standard_normal(r.weights.shape).astype("float32"))
        loss = (r.rows * g_rows).sum() + (r.weights * g_w).sum() + (r.probs * r.probs).sum()
        loss.backward()
        grads[backend] = (x.grad, logits.grad)
    assert_close(grads["custom"][0], grads["reference"][0], what="grad x")
    assert_close(grads["custom"][1], grads["reference"][1], rtol=1e-4, atol=1e-5, what="grad logits")


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_no_expert_keeps_a_second_choice_while_dropping_a_first(seed):
    """Random router, top-2, cf 1.0, T=512, E=8 (the setting of issue 14)."""
    T, D, E = 512, 32, 8
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal((T, D)).astype("float32"))
    w = paddle.to_tensor((rng.standard_normal((D, E)) * 0.3).astype("float32"))
    logits = paddle.matmul(x, w)
    for backend in ("custom", "reference"):
        r = ops.gate_dispatch(x, logits, top_k=2, capacity_factor=1.0, normalize=True, backend=backend)
        ids, pos = r.ids.numpy(), r.positions.numpy()
        for e in range(E):
            first_dropped = ((ids[:, 0] == e) & (pos[:, 0] < 0)).any()
            second_kept = ((ids[:, 1] == e) & (pos[:, 1] >= 0)).any()
            assert not (first_dropped and second_kept), f"seed {seed} {backend}: expert {e}"
    # the old token-major rule violates it on these inputs (the reason for the change): it drops
    # first choices (20-33 here) and leaves tokens with no expert, with the same kept total
    tok = ops.gate_dispatch(x, logits, top_k=2, capacity_factor=1.0, normalize=True, capacity_rule="token")
    ch = ops.gate_dispatch(x, logits, top_k=2, capacity_factor=1.0, normalize=True)
    tp, cp = tok.positions.numpy(), ch.positions.numpy()
    assert (tp[:, 0] < 0).sum() > 0 and (tp < 0).all(axis=1).sum() > 0
    assert (cp < 0).all(axis=1).sum() < (tp < 0).all(axis=1).sum()
    assert int(ch.counts.numpy().sum()) == int(tok.counts.numpy().sum()), "same kept total: only who keeps changes"


# ------------------------------------------------------------------ score functions, selection bias
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias_kind", ["none", "expert", "token"])
def test_score_fn_and_select_bias_match_numpy_and_reference(score_fn, bias_kind):
    T, D, E, K = 64, 8, 16, 4
    x, logits = _inputs(T, D, E, seed=17)
    rng = np.random.default_rng(3)
    bias = None
    if bias_kind == "expert":
        bias = rng.standard_normal(E).astype("float32") * 0.2
    elif bias_kind == "token":  # device-limited style: only experts 4..11 allowed
        bias = np.zeros((T, E), np.float32)
        bias[:, :4] = -np.inf
        bias[:, 12:] = -np.inf
    sb = None if bias is None else paddle.to_tensor(bias)
    got = _dispatch_both(x, logits, top_k=K, capacity_factor=1.0, normalize=True, select_bias=sb, score_fn=score_fn)
    z = logits.numpy().astype(np.float64)
    p = 1 / (1 + np.exp(-z)) if score_fn == "sigmoid" else np.exp(z - z.max(1, keepdims=True))
    if score_fn == "softmax":
        p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(got.probs.numpy(), p, rtol=1e-5)
    key = got.probs.numpy() + (0 if bias is None else bias)
    ids = np.argsort(-key, axis=1, kind="stable")[:, :K]
    assert_equal(got.ids, ids.astype(np.int32), "ids = top-k of probs + bias")
    sel = np.take_along_axis(got.probs.numpy(), ids, 1)
    np.testing.assert_allclose(got.weights.numpy(), sel / sel.sum(1, keepdims=True), rtol=1e-5)  # no bias
    if bias_kind == "token":
        assert ((ids >= 4) & (ids < 12)).all()


def test_select_bias_changes_selection_never_weights():
    x = paddle.ones([2, 1])
    logits = paddle.to_tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    bias = paddle.to_tensor([0.0, 0.0, 1.0])  # expert 2 favoured for selection
    for backend in ("custom", "reference"):
        plain = ops.gate_dispatch(x, logits, top_k=1, capacity_factor=0.0, normalize=False, backend=backend)
        biased = ops.gate_dispatch(x, logits, top_k=1, capacity_factor=0.0, normalize=False, select_bias=bias, backend=backend)
        assert plain.ids.numpy().ravel().tolist() == [0, 2]
        assert biased.ids.numpy().ravel().tolist() == [2, 2]
        p = plain.probs.numpy()
        # the weight of the biased pick is its unbiased probability
        np.testing.assert_allclose(biased.weights.numpy().ravel(), [p[0, 2], p[1, 2]], rtol=1e-6)
        assert_close(biased.probs, plain.probs, what="probs never see the bias")


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_score_fn_gradients_match_reference(score_fn):
    x0, l0 = _inputs(40, 8, 8, seed=9)
    bias = paddle.to_tensor(np.random.default_rng(1).standard_normal(8).astype("float32") * 0.1)
    grads = {}
    for backend in ("custom", "reference"):
        x, logits = x0.clone(), l0.clone()
        x.stop_gradient = logits.stop_gradient = False
        r = ops.gate_dispatch(x, logits, top_k=3, capacity_factor=1.0, normalize=True, select_bias=bias,
                              score_fn=score_fn, backend=backend)
        rng = np.random.default_rng(2)
        g_rows = paddle.to_tensor(rng.standard_normal(r.rows.shape).astype("float32"))
        g_w = paddle.to_tensor(rng.standard_normal(r.weights.shape).astype("float32"))
        g_p = paddle.to_tensor(rng.standard_normal(r.probs.shape).astype("float32"))
        ((r.rows * g_rows).sum() + (r.weights * g_w).sum() + (r.probs * g_p).sum()).backward()
        grads[backend] = (x.grad, logits.grad)
    assert_close(grads["custom"][0], grads["reference"][0], what="grad x")
    assert_close(grads["custom"][1], grads["reference"][1], rtol=1e-4, atol=1e-5, what="grad logits")


def test_bad_score_fn_and_bias_shape():
    x, logits = _inputs(4, 8, 3)
    with pytest.raises(ValueError, match="score_fn must be one of"):
        ops.gate_dispatch(x, logits, top_k=2, capacity_factor=1.0, normalize=True, score_fn="tanh")
    with pytest.raises(ValueError, match="'select_bias' must have shape"):
        ops.gate_dispatch(x, logits, top_k=2, capacity_factor=1.0, normalize=True, select_bias=paddle.zeros([4]))
