"""GPT-MoE model: KV-cache decoding, expert recomputation, dense variant, input checks."""

import numpy as np
import paddle
import pytest

from paddle_semoe import ops
from paddle_semoe.models.gpt import GPTConfig, GPTMoE
from paddle_semoe.moe import MoESettings


def _model(**kw):
    paddle.seed(2)
    base = dict(d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=24, moe_every=2,
                moe=MoESettings(num_experts=4, dropless=True))
    base.update(kw)
    return GPTMoE(GPTConfig(**base))


def test_kv_cache_decoding_equals_full_forward():
    m = _model()
    m.eval()
    x = paddle.to_tensor(np.random.default_rng(0).integers(0, 256, (2, 12)))
    full = m(x).logits
    a = m(x[:, :5])
    b = m(x[:, 5:9], caches=a.caches)
    c = m(x[:, 9:], caches=b.caches)
    np.testing.assert_allclose(paddle.concat([a.logits, b.logits, c.logits], axis=1).numpy(), full.numpy(), rtol=1e-5, atol=1e-5)


def test_recomputed_experts_give_identical_loss_and_grads():
    x = paddle.to_tensor(np.random.default_rng(1).integers(0, 256, (2, 10)))
    y = paddle.to_tensor(np.random.default_rng(2).integers(0, 256, (2, 10)))
    results = []
    for recompute in (False, True):
        paddle.seed(2)
        m = GPTMoE(GPTConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=24, moe_every=1,
                             moe=MoESettings(num_experts=4, gate="gshard")), recompute_moe=recompute)
        paddle.seed(9)  # same GShard noise
        out = m(x, y)
        out.loss.backward()
        results.append((float(out.loss), {n: p.grad.numpy() for n, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert l0 == l1
    assert g0.keys() == g1.keys()
    for n in g0:
        np.testing.assert_allclose(g1[n], g0[n], rtol=1e-6, atol=1e-7, err_msg=n)


def test_dense_variant_and_moe_layer_placement():
    assert _model(moe_every=0).config.moe_layers == []
    assert _model(moe_every=2).config.moe_layers == [1, 3]
    out = _model(moe_every=0)(paddle.to_tensor([[1, 2, 3]]))
    assert out.moe_stats == [] and float(out.aux_loss) == 0.0


def test_errors():
    with pytest.raises(ValueError, match="exceeds max_seq_len=24"):
        _model()(paddle.zeros([1, 25], dtype="int64"))
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="top_k must be in"):
        MoESettings(num_experts=4, top_k=5)


def test_attend_many_equals_attend_per_sequence():
    """Batched decode attention (one qkv / projection GEMM over the batch, attention per cache)
    gives each sequence what its own ``attend`` gives, for caches of different lengths."""
    paddle.seed(3)
    cfg = GPTConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, moe_every=0)
    model = GPTMoE(cfg)
    model.eval()
    block = model.blocks[0]
    caches, xs = [], []
    for length in (1, 5, 3):
        _, cache = block.attend(paddle.randn([1, length, 32]))
        caches.append(cache)
        xs.append(paddle.randn([1, 1, 32]))
    with paddle.no_grad():
        y, new = block.attend_many(paddle.concat(xs, axis=0), caches)
        for b, (x, cache) in enumerate(zip(xs, caches)):
            ref_y, ref_cache = block.attend(x, cache)
            np.testing.assert_allclose(y[b : b + 1].numpy(), ref_y.numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(new[b].k.numpy(), ref_cache.k.numpy())
            np.testing.assert_array_equal(new[b].v.numpy(), ref_cache.v.numpy())
    with pytest.raises(ValueError, match="3 tokens but 2 caches"):
        block.attend_many(paddle.concat(xs, axis=0), caches[:2])


@pytest.mark.parametrize("moe_every", [0, 2])
def test_fused_residual_forward_equals_the_unfused_blocks(moe_every):
    """GPTMoE.forward leaves residual adds to the next LayerNorm (the embedding sum to the
    first block's ln1, a block's FFN add to the next block's ln1): the logits equal the unfused
    composition ``embed -> Block.forward ... -> head`` bit for bit, and so do the gradients up to
    float32 summation order (the position-embedding gradient is a scatter-add, not a broadcast
    reduction)."""
    x = paddle.to_tensor(np.random.default_rng(5).integers(0, 256, (3, 10)))
    y = paddle.to_tensor(np.random.default_rng(6).integers(0, 256, (3, 10)))
    m = _model(moe_every=moe_every, moe=MoESettings(num_experts=4, dropless=True))
    m.eval()  # deterministic routing for both passes (gradients still flow)
    fused = m(x, y)
    fused.lm_loss.backward()
    g_fused = {n: p.grad.numpy().copy() for n, p in m.named_parameters() if p.grad is not None}
    m.clear_gradients()
    h = m.embed(x)
    for block in m.blocks:
        h = block(h).x
    logits = m.head(h)
    np.testing.assert_array_equal(fused.logits.numpy(), logits.numpy())
    ops.softmax_cross_entropy(logits.reshape([-1, logits.shape[-1]]), y.reshape([-1])).backward()
    g_plain = {n: p.grad.numpy() for n, p in m.named_parameters() if p.grad is not None}
    assert g_fused.keys() == g_plain.keys()
    for n in g_fused:
        np.testing.assert_allclose(g_fused[n], g_plain[n], rtol=1e-5, atol=1e-7, err_msg=n)


def test_training_forward_runs_each_blocks_forward_pre_hooks_in_order():
    """The model calls its blocks through the layer (``block(..., deferred=True)``), so a forward
    pre-hook on a block runs before that block computes: ``storage.shard_dense`` waits there for
    the block's all-gather (a direct ``forward_deferred`` call skipped the hooks, and blocks read
    parameters that a background gather was still writing)."""
    m = _model()
    seen = []
    for i, block in enumerate(m.blocks):
        block.register_forward_pre_hook(lambda _layer, _inputs, i=i: seen.append(i))
    x = paddle.to_tensor(np.random.default_rng(3).integers(0, 256, (2, 8)))
    m(x, x)
    assert seen == list(range(len(m.blocks)))
