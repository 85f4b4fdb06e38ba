"""Fused causal attention against the pure-Paddle reference (materialized scores, masked
softmax), forward and gradients for qkv and for a KV cache.

Tolerance (float32): rtol = atol = 2e-5. The kernel sums scores and outputs in register
blocks of 16 keys and rebuilds the probabilities from the saved log-sum-exp with a
polynomial exp (~2 ulp), so it agrees with Paddle to ~1e-6 relative.
"""

import numpy as np
import paddle
import pytest

from paddle_semoe import ops
from paddle_semoe.models.gpt import GPTConfig, GPTMoE
from tests._helpers import assert_close, assert_equal


def _run(qkv0, past0, H, g, backend):
    qkv = qkv0.clone()
    qkv.stop_gradient = False
    past = None
    if past0 is not None:
        past = [t.clone() for t in past0]
        for t in past:
            t.stop_gradient = False
    out = ops.causal_attention(qkv, H, k_past=past[0] if past else None, v_past=past[1] if past else None, backend=backend)
    if out.size:
        (out * g).sum().backward()
    return out, qkv.grad, (past[0].grad, past[1].grad) if past else (None, None)


@pytest.mark.parametrize(
    "B,S,H,Dh,P",
    [
        (2, 5, 3, 7, 0),  # odd head dim
        (2, 1, 2, 4, 0),  # sequence length 1
        (1, 3, 2, 5, 4),  # KV cache
        (2, 1, 2, 8, 9),  # one decode step against a cache
        (1, 9, 1, 17, 3),  # head dim past one vector, blocks of queries with a cache
        (2, 20, 2, 16, 0),  # several query blocks
        (1, 70, 2, 16, 0),  # two backward blocks of 64 query rows, the second partial
        (1, 67, 1, 8, 5),  # two backward blocks with a cache
        (1, 33, 1, 48, 0),  # head dim of three 16-float chunks (a 32-wide tile and a 16-wide tail)
        (1, 0, 2, 4, 0),  # no tokens
        # no cache, head dim a multiple of 16, length a multiple of 8: q, k, dO read and out,
        # dQ, dK, dV written in place (the others take the padded-copy path)
        (2, 16, 2, 16, 0),
        (1, 136, 2, 32, 0),  # three backward query blocks: dK/dV written, then added to
        (1, 64, 1, 48, 0),  # head dim of three 16-float chunks in place
    ],
)
def test_matches_reference(B, S, H, Dh, P):
    rng = np.random.default_rng(B * 1000 + S * 10 + P)
    mk = lambda *s: paddle.to_tensor(rng.standard_normal(s).astype("float32"))  # noqa: E731
    qkv = mk(B, S, 3 * H * Dh)
    past = (mk(B, H, P, Dh), mk(B, H, P, Dh)) if P else None
    g = mk(B, S, H * Dh)
    got = _run(qkv, past, H, g, "custom")
    want = _run(qkv, past, H, g, "reference")
    assert_close(got[0], want[0], rtol=2e-5, atol=2e-5, what="out")
    if S:
        assert_close(got[1], want[1], rtol=2e-5, atol=2e-5, what="grad qkv")
    if P:
        for a, b, name in zip(got[2], want[2], ("grad k_past", "grad v_past")):
            assert_close(a, b, rtol=2e-5, atol=2e-5, what=name)


def test_masked_positions_get_no_gradient_and_do_not_change_earlier_outputs():
    """Changing the last token's q/k/v changes no earlier output; the earlier outputs' gradient
    reaches no later key or value."""
    B, S, H, Dh = 1, 6, 2, 8
    qkv = paddle.randn([B, S, 3 * H * Dh])
    bumped = qkv.clone()
    bumped[:, -1] = bumped[:, -1] + 5.0
    a = ops.causal_attention(qkv, H)
    b = ops.causal_attention(bumped, H)
    assert_equal(a[:, :-1], b[:, :-1], what="earlier outputs")
    qkv.stop_gradient = False
    out = ops.causal_attention(qkv, H)
    out[:, :3].sum().backward()
    assert not qkv.grad.numpy()[:, 3:].any(), "keys/values after position 2 are masked for queries 0..2"


def test_deterministic():
    qkv = paddle.randn([3, 17, 3 * 4 * 8])
    assert_equal(ops.causal_attention(qkv, 4), ops.causal_attention(qkv, 4))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="'qkv' must be float32"):
        ops.causal_attention(paddle.randn([1, 2, 12]).astype("float64"), 2)
    with pytest.raises(ValueError, match="3 \\* num_heads"):
        ops.causal_attention(paddle.randn([1, 2, 10]), 2)
    with pytest.raises(ValueError, match="'k_past' must have shape"):
        ops.causal_attention(paddle.randn([1, 2, 12]), 2, k_past=paddle.randn([1, 3, 1, 2]), v_past=paddle.randn([1, 3, 1, 2]))
    with pytest.raises(ValueError, match="both k_past and v_past"):
        ops.causal_attention(paddle.randn([1, 2, 12]), 2, k_past=paddle.randn([1, 2, 1, 2]))


def test_model_forward_and_incremental_decoding_agree_across_backends():
    """The whole GPT on the fused backend equals the reference backend: training forward
    (logits, loss, gradients) and token-by-token decoding through the KV cache."""
    results = {}
    for backend in ("custom", "reference"):
        paddle.seed(5)
        cfg = GPTConfig(vocab_size=40, max_seq_len=12, d_model=24, n_layers=2, n_heads=3, d_ff=32, moe_every=0, ops_backend=backend)
        model = GPTMoE(cfg)
        tokens = paddle.to_tensor(np.random.default_rng(0).integers(0, 40, (2, 10)).astype("int64"))
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
        model.eval()
        with paddle.no_grad():
            step = model(tokens[:, :4])
            caches, logits = step.caches, [step.logits[:, -1]]
            for t in range(4, 9):
                step = model(tokens[:, t : t + 1], caches=caches)
                caches = step.caches
                logits.append(step.logits[:, -1])
        results[backend] = (out.logits, out.loss, grads, paddle.stack(logits, 1))
    got, want = results["custom"], results["reference"]
    assert_close(got[0], want[0], rtol=2e-5, atol=2e-5, what="logits")
    assert_close(got[1], want[1], rtol=2e-6, atol=2e-6, what="loss")
    for name in want[2]:
        assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-6, what=f"grad {name}")
    assert_close(got[3], want[3], rtol=2e-5, atol=2e-5, what="decoded logits")
    assert_close(got[3], got[0][:, 3:9], rtol=2e-5, atol=2e-5, what="cached decoding = full forward")
