"""MoELayer: equivalences, capacity, determinism, gates, aux losses, stats, config errors."""

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddle_semoe.moe import MoEConfig, MoELayer, MoESettings, classify_parameters, load_balance_loss, router_z_loss
from tests._helpers import assert_close, assert_equal


def _layer(seed=0, **kw):
    paddle.seed(seed)
    base = dict(d_model=16, d_ff=32, num_experts=4, top_k=2)
    base.update(kw)
    return MoELayer(MoEConfig(**base))


def _run(layer, x0, g):
    x = x0.clone()
    x.stop_gradient = False
    out = layer(x)
    loss = (out.y * g).sum() + out.aux_loss
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in layer.named_parameters() if p.grad is not None}
    layer.clear_gradients()
    return out, x.grad.numpy(), grads


def test_one_expert_top1_equals_dense_ffn():
    layer = _layer(num_experts=1, top_k=1, dropless=True, aux_loss_coef=0.0, z_loss_coef=0.0)
    x0 = paddle.randn([3, 7, 16])
    g = paddle.randn([3, 7, 16])
    out, gx, grads = _run(layer, x0, g)

    w1, b1, w2, b2 = (p.detach().clone() for p in (layer.experts.w1[0], layer.experts.b1[0], layer.experts.w2[0], layer.experts.b2[0]))
    for p in (w1, b1, w2, b2):
        p.stop_gradient = False
    x = x0.clone()
    x.stop_gradient = False
    dense = paddle.matmul(F.gelu(paddle.matmul(x, w1) + b1), w2) + b2
    (dense * g).sum().backward()
    assert_close(out.y, dense, rtol=1e-5, atol=1e-5, what="output")
    assert_close(gx, x.grad, rtol=1e-5, atol=1e-5, what="grad x")
    assert_close(grads["experts.w1"][0], w1.grad, rtol=1e-4, atol=1e-5, what="grad w1")
    assert_close(grads["experts.w2"][0], w2.grad, rtol=1e-4, atol=1e-5, what="grad w2")
    assert_close(grads["experts.b1"][0], b1.grad, rtol=1e-4, atol=1e-5, what="grad b1")
    assert_close(grads["experts.b2"][0], b2.grad, rtol=1e-4, atol=1e-5, what="grad b2")
    assert not grads["router.weight"].any(), "a single expert gets weight 1: no router gradient"


@pytest.mark.parametrize(
    "kw",
    [
        dict(gate="topk", top_k=2, capacity_factor=1.0),
        dict(gate="topk", top_k=3, dropless=True),
        dict(gate="gshard", capacity_factor=1.25),
        dict(gate="switch", capacity_factor=1.0),
        dict(gate="topk", top_k=1, capacity_factor=0.5, activation="silu"),
    ],
)
def test_custom_ops_path_equals_reference_path(kw):
    x0 = paddle.randn([64, 16])
    g = paddle.randn([64, 16])
    results = {}
    for backend in ("custom", "reference"):
        layer = _layer(seed=3, ops_backend=backend, **kw)
        paddle.seed(99)  # same gate noise for both paths
        results[backend] = _run(layer, x0, g)
    (oc, gxc, gc), (orf, gxr, gr) = results["custom"], results["reference"]
    assert_close(oc.y, orf.y, rtol=1e-5, atol=1e-5, what="y")
    assert_close(oc.aux_loss, orf.aux_loss, rtol=1e-5, what="aux")
    assert_equal(oc.stats.kept, orf.stats.kept, "kept")
    assert_equal(oc.stats.demand, orf.stats.demand, "demand")
    assert_close(gxc, gxr, rtol=1e-4, atol=1e-5, what="grad x")
    assert gc.keys() == gr.keys()
    for name in gc:
        assert_close(gc[name], gr[name], rtol=1e-4, atol=1e-5, what=f"grad {name}")


def test_grouped_experts_equal_sequential_reference():
    layer = _layer(num_experts=6, d_ff=48)
    d = layer.route(paddle.randn([40, 16])).dispatch
    assert_close(layer.experts(d.rows, d.counts), layer.experts.forward_sequential(d.rows, d.counts), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("cf", [0.3, 0.75, 1.0, 1.25])
def test_no_expert_exceeds_capacity(cf):
    layer = _layer(num_experts=8, top_k=2, capacity_factor=cf)
    T = 200
    out = layer(paddle.randn([T, 16]) * 3)
    cap = -(-(round(cf * 10**6) * T * 2) // (8 * 10**6))  # exact ceil(cf * T * k / E)
    kept, demand = out.stats.kept.numpy(), out.stats.demand.numpy()
    assert kept.max() <= cap
    assert_equal(kept, np.minimum(demand, cap))
    assert float(out.stats.dropped_fraction) == pytest.approx(1 - kept.sum() / (T * 2), abs=1e-6)


def test_bit_identical_across_two_runs():
    outs = []
    for _ in range(2):
        layer = _layer(seed=5, gate="gshard")
        paddle.seed(7)
        outs.append(_run(layer, paddle.ones([32, 16]) * paddle.arange(16, dtype="float32") / 16, paddle.ones([32, 16])))
    (o1, gx1, g1), (o2, gx2, g2) = outs
    assert_equal(o1.y, o2.y)
    assert_equal(gx1, gx2)
    for k in g1:
        assert_equal(g1[k], g2[k], k)


def test_gshard_random_routing_only_while_training():
    layer = _layer(gate="gshard", dropless=True, num_experts=4)
    x = paddle.randn([400, 16])
    train = layer(x)
    assert 0.0 < float(train.stats.dropped_fraction) < 0.5  # some second choices skipped
    layer.eval()
    assert float(layer(x).stats.dropped_fraction) == 0.0


def test_switch_jitter_only_while_training():
    layer = _layer(gate="switch", jitter_eps=0.2, dropless=True)
    x = paddle.randn([64, 16])
    layer.eval()
    assert_equal(layer(x).y, layer(x).y)
    layer.train()
    paddle.seed(1)
    a = layer.router(x).logits
    paddle.seed(2)
    b = layer.router(x).logits
    assert not np.allclose(a.numpy(), b.numpy())


def test_load_balance_loss_is_one_when_uniform_and_z_loss_value():
    T, E = 8, 4
    probs = paddle.full([T, E], 1.0 / E)
    counts = paddle.to_tensor([4, 4, 4, 4], dtype="int32")  # T*K = 16 choices, uniform
    assert float(load_balance_loss(probs, counts, top_k=2)) == pytest.approx(1.0)
    skew = paddle.to_tensor([16, 0, 0, 0], dtype="int32")
    p = np.array([[0.7, 0.1, 0.1, 0.1]] * T, np.float32)
    assert float(load_balance_loss(paddle.to_tensor(p), skew, top_k=2)) == pytest.approx(4 * 1.0 * 0.7)
    logits = np.random.default_rng(0).standard_normal((5, 3)).astype("float32")
    lse = np.log(np.exp(logits).sum(1))
    assert float(router_z_loss(paddle.to_tensor(logits))) == pytest.approx(float((lse**2).mean()), rel=1e-5)


def test_aux_loss_combines_coefficients():
    layer = _layer(aux_loss_coef=0.5, z_loss_coef=0.25)
    out = layer(paddle.randn([20, 16]))
    assert float(out.aux_loss) == pytest.approx(0.5 * float(out.balance_loss) + 0.25 * float(out.z_loss), rel=1e-6)


def test_input_shape_kept_and_checked():
    layer = _layer()
    assert layer(paddle.randn([2, 3, 16])).y.shape == [2, 3, 16]
    with pytest.raises(ValueError, match="d_model=16"):
        layer(paddle.randn([4, 8]))


def test_parameter_classes():
    layer = _layer()
    groups = classify_parameters(layer)
    assert [n for n, _ in groups["gate"]] == ["router.weight"]
    assert sorted(n for n, _ in groups["expert"]) == ["experts.b1", "experts.b2", "experts.w1", "experts.w2"]
    assert groups["dense"] == []


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_experts=0), "num_experts must be positive"),
        (dict(top_k=5), r"top_k must be in \[1, num_experts=4\]"),
        (dict(gate="expert_choice"), "gate must be one of"),
        (dict(capacity_factor=0.0), "capacity_factor must be > 0 unless dropless"),
        (dict(activation="tanh"), "activation must be one of"),
        (dict(jitter_eps=1.5), "jitter_eps must be in"),
        (dict(ops_backend="fast"), "ops_backend must be one of"),
    ],
)
def test_config_errors(kw, match):
    base = dict(d_model=16, d_ff=32, num_experts=4, top_k=2)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**base)


def test_settings_resolve_one_layer_config():
    """MoESettings (YAML model.moe) holds the shared rules; layer() adds widths and kernels."""
    shared = MoESettings(num_experts=4, gate="switch", top_k=2, capacity_factor=1.5)
    cfg = shared.layer(d_model=16, d_ff=64, activation="relu", init_std=0.1, ops_backend="reference")
    assert isinstance(cfg, MoESettings)
    assert (cfg.d_model, cfg.d_ff, cfg.activation, cfg.init_std, cfg.ops_backend) == (16, 64, "relu", 0.1, "reference")
    assert (cfg.num_experts, cfg.gate, cfg.capacity_factor, cfg.k, cfg.normalize) == (4, "switch", 1.5, 1, False)
    assert shared.k == 1 and not shared.normalize
    # an expert width in the settings wins over the model's FFN width
    assert MoESettings(num_experts=4, d_ff=24).layer(d_model=16, d_ff=64).d_ff == 24
    with pytest.raises(TypeError, match="d_ff"):
        MoEConfig(d_model=16, num_experts=4)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="d_ff must be positive, got 0"):
        MoESettings(d_ff=0)
    with pytest.raises(ValueError, match="d_model must be positive"):
        shared.layer(d_model=0, d_ff=8)
