"""Routers (paddle_semoe.moe.routers) against independent NumPy models of their rules."""

import math

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddle_semoe import ops
from paddle_semoe.inference.export import export_package
from paddle_semoe.inference.package import read_manifest
from paddle_semoe.inference.runner import build_skeleton
from paddle_semoe.models.gpt import GPTConfig, GPTMoE
from paddle_semoe.moe import MoESettings
from paddle_semoe.moe import MoEConfig, MoELayer, classify_parameters, update_balance_biases
from paddle_semoe.moe.config import ROUTER_KINDS
from paddle_semoe.moe.monitor import balance_biases, routing_scalars
from paddle_semoe.moe.routers import ROUTERS, AuxFreeRouter, DeviceLimitedRouter, ExpertChoiceRouter, make_router
from tests._helpers import assert_close, assert_equal


def _layer(seed=0, **kw):
    paddle.seed(seed)
    base = dict(d_model=16, d_ff=32, num_experts=8, top_k=2)
    base.update(kw)
    return MoELayer(MoEConfig(**base))


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_router_registry_matches_config_kinds():
    assert tuple(ROUTERS) == ROUTER_KINDS
    for kind in ROUTER_KINDS:
        extra = dict(device_groups=4, device_limit=2) if kind == "device_limited" else {}
        r = make_router(MoEConfig(d_model=8, d_ff=16, num_experts=8, router=kind, **extra))
        assert r.kind == kind and r.weight.shape == [8, 8]


# ------------------------------------------------------------------ aux-loss-free balancing
def test_aux_free_bias_changes_selection_never_weights():
    layer = _layer(router="aux_free", capacity_factor=4.0, normalize_topk=False)
    layer.eval()
    x = paddle.randn([64, 16])
    bias = np.zeros(8, np.float32)
    bias[5] = 10.0  # expert 5 always selected first
    layer.router.balance_bias.set_value(paddle.to_tensor(bias))
    d = layer.route(x).dispatch
    logits = paddle.matmul(x, layer.router.weight).numpy()
    p = _softmax(logits.astype(np.float64))
    ids = np.argsort(-(p + bias), axis=1, kind="stable")[:, :2]
    assert (ids[:, 0] == 5).all()
    assert_equal(d.expert_ids, ids.astype(np.int32), "selection uses probs + bias")
    np.testing.assert_allclose(d.weights.numpy(), np.take_along_axis(p, ids, 1), rtol=1e-5)  # unbiased


def test_aux_free_bias_update_rule_and_load_accumulation():
    layer = _layer(router="aux_free", bias_update_rate=0.01, capacity_factor=1.0)
    router = layer.router
    assert isinstance(router, AuxFreeRouter)
    # the rule alone: mean load 6 -> overloaded experts go down, underloaded up, equal stay
    router.apply_load(np.array([10, 2, 6, 6, 0, 12, 6, 6], np.float64))
    np.testing.assert_allclose(router.balance_bias.numpy(), [-0.01, 0.01, 0, 0, 0.01, -0.01, 0, 0], atol=1e-8)
    router.balance_bias.set_value(paddle.zeros([8]))
    # load accumulated by training forwards = selected assignments per expert (before capacity)
    layer.train()
    loads = np.zeros(8)
    for seed in range(3):
        paddle.seed(seed)
        out = layer(paddle.randn([40, 16]))
        loads += out.stats.demand.numpy()
    assert_close(router.pending_load, loads.astype(np.float32), what="pending load")
    seen = []
    got = update_balance_biases(layer, all_reduce_sum=lambda t: (seen.append(1), t.scale_(2.0)))  # 2 "ranks"
    assert seen == [1]
    np.testing.assert_allclose(got[0], 2 * loads)
    np.testing.assert_allclose(router.balance_bias.numpy(), 0.01 * np.sign(loads.mean() - loads), atol=1e-8)
    assert not router.pending_load.numpy().any(), "pending load resets after an update"


def test_aux_free_bias_is_a_persistable_buffer_not_a_parameter():
    layer = _layer(router="aux_free")
    assert "router.balance_bias" in layer.state_dict()
    assert "router.pending_load" not in layer.state_dict()
    names = [n for group in classify_parameters(layer).values() for n, _ in group]
    assert "router.balance_bias" not in names


# ------------------------------------------------------------------ device-limited routing
@pytest.mark.parametrize("G,M,K", [(4, 2, 4), (4, 1, 2), (8, 3, 6), (2, 2, 2)])
def test_device_limited_never_exceeds_m_groups(G, M, K):
    E, T = 16, 256
    layer = _layer(num_experts=E, top_k=K, router="device_limited", device_groups=G, device_limit=M, capacity_factor=2.0)
    paddle.seed(7)
    x = paddle.randn([T, 16]) * 3.0
    d = layer.route(x).dispatch
    ids = d.expert_ids.numpy()
    groups = ids // (E // G)
    assert max(len(set(row)) for row in groups) <= M
    # independent model: the M groups with the best expert logit, then top-k inside them
    logits = paddle.matmul(x, layer.router.weight).numpy()
    best = logits.reshape(T, G, E // G).max(-1)
    allowed = np.argsort(-best, axis=1, kind="stable")[:, :M]
    mask = np.full((T, E), -np.inf, np.float32)
    for t in range(T):
        for g in allowed[t]:
            mask[t, g * (E // G) : (g + 1) * (E // G)] = 0.0
    p = d.probs.numpy()
    want = np.argsort(-(p + mask), axis=1, kind="stable")[:, :K]
    assert_equal(ids, want.astype(np.int32), "device-limited selection")
    sel = np.take_along_axis(p, want, 1)
    np.testing.assert_allclose(d.weights.numpy(), sel / sel.sum(1, keepdims=True), rtol=1e-5)


# ------------------------------------------------------------------ expert choice
@pytest.mark.parametrize("T,E,k,cf", [(64, 8, 2, 1.0), (50, 4, 1, 1.25), (30, 6, 2, 0.5)])
def test_expert_choice_each_expert_takes_its_top_c_tokens(T, E, k, cf):
    layer = _layer(num_experts=E, top_k=k, router="expert_choice", capacity_factor=cf)
    assert isinstance(layer.router, ExpertChoiceRouter)
    x = paddle.randn([T, 16])
    d = layer.route(x).dispatch
    c = math.ceil(cf * T * k / E)
    assert d.counts.numpy().tolist() == [c] * E, "every expert takes exactly c tokens"
    p = d.probs.numpy()
    ids, pos, w = d.expert_ids.numpy(), d.positions.numpy(), d.weights.numpy()
    for e in range(E):
        chosen = sorted(np.argsort(-p[:, e], kind="stable")[:c].tolist())  # ties by token index
        t_idx, j_idx = np.nonzero((ids == e) & (pos >= 0))
        assert sorted(t_idx.tolist()) == chosen
        np.testing.assert_allclose(w[t_idx, j_idx], p[t_idx, e], rtol=1e-6)  # weight = score
    out = layer(x)
    assert out.y.shape == [T, 16] and float(out.balance_loss) == pytest.approx(1.0, rel=1e-5)


# ------------------------------------------------------------------ shared experts, sigmoid
def test_shared_experts_equal_a_dense_ffn_added_to_the_routed_output():
    paddle.seed(3)
    x = paddle.randn([2, 12, 16])
    routed = _layer(seed=1, capacity_factor=1.0)
    shared = _layer(seed=1, capacity_factor=1.0, num_shared_experts=2, shared_d_ff=8)
    assert shared.shared_experts.w1.shape == [16, 16]
    # same routed weights (the shared FFN is created after them)
    for name in ("router.weight", "experts.w1", "experts.w2"):
        assert_equal(shared.state_dict()[name], routed.state_dict()[name], name)
    se = shared.shared_experts
    for p in (se.b1, se.b2):
        p.set_value(paddle.randn(p.shape) * 0.1)
    got = shared(x).y.reshape([-1, 16])
    base = routed(x).y.reshape([-1, 16])
    xt = x.reshape([-1, 16])
    dense = paddle.matmul(F.gelu(paddle.matmul(xt, se.w1) + se.b1), se.w2) + se.b2
    assert_close(got, base + dense, rtol=1e-5, atol=1e-5, what="shared = dense FFN added")
    groups = classify_parameters(shared)
    assert {n for n, _ in groups["dense"]} == {f"shared_experts.{w}" for w in ("w1", "b1", "w2", "b2")}


def test_sigmoid_scores_with_topk_renormalization():
    layer = _layer(score_fn="sigmoid", top_k=3, capacity_factor=4.0)
    x = paddle.randn([32, 16])
    d = layer.route(x).dispatch
    z = paddle.matmul(x, layer.router.weight).numpy().astype(np.float64)
    s = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(d.probs.numpy(), s, rtol=1e-5)
    ids = np.argsort(-d.probs.numpy(), axis=1, kind="stable")[:, :3]
    assert_equal(d.expert_ids, ids.astype(np.int32))
    np.testing.assert_allclose(d.weights.numpy().sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("router", ["token_choice", "aux_free", "device_limited", "expert_choice"])
def test_every_router_custom_ops_equal_reference(router):
    extra = dict(device_groups=4, device_limit=2) if router == "device_limited" else {}
    outs = {}
    for backend in ("custom", "reference"):
        layer = _layer(seed=4, router=router, ops_backend=backend, num_shared_experts=1, **extra)
        paddle.seed(9)
        x = paddle.randn([48, 16])
        x.stop_gradient = False
        out = layer(x)
        (out.y.square().sum() + out.aux_loss).backward()
        outs[backend] = (out.y.numpy(), x.grad.numpy(), layer.router.weight.grad.numpy())
    for a, b, what in zip(outs["custom"], outs["reference"], ("y", "grad x", "grad router")):
        assert_close(a, b, rtol=1e-4, atol=1e-5, what=what)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(router="nope"), "router must be one of"),
        (dict(score_fn="tanh"), "score_fn must be one of"),
        (dict(router="aux_free", bias_update_rate=0.0), "bias_update_rate must be > 0"),
        (dict(router="device_limited", device_groups=3), "device_groups must be >= 1 and divide"),
        (dict(router="device_limited", device_groups=4, device_limit=5), "device_limit must be in"),
        (dict(router="device_limited", device_groups=8, device_limit=1, top_k=2), "give >= top_k=2"),
        (dict(router="expert_choice", gate="gshard"), "needs gate=topk"),
        (dict(num_shared_experts=-1), "num_shared_experts must be >= 0"),
        (dict(min_capacity=-1), "min_capacity must be >= 0"),
        (dict(drop_policy="random"), "drop_policy must be one of"),
        (dict(capacity_order="expert"), "capacity_order must be one of"),
        (dict(drop_policy="probs", batch_priority=True), "apply to drop_policy=position"),
    ],
)
def test_router_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(d_model=8, d_ff=16, num_experts=8, **kw)


def test_layer_config_threads_capacity_rules_to_the_op():
    x = paddle.randn([96, 16])
    for kw, rule, bpr in [
        (dict(), "choice", False),
        (dict(capacity_order="token"), "token", False),
        (dict(drop_policy="probs"), "probs", False),
        (dict(batch_priority=True, min_capacity=20), "choice", True),
    ]:
        layer = _layer(seed=2, capacity_factor=0.5, **kw)
        d = layer.route(x).dispatch
        logits = paddle.matmul(x, layer.router.weight)
        ref = ops.gate_dispatch(x, logits, top_k=2, capacity_factor=0.5, normalize=True, capacity_rule=rule,
                                batch_priority=bpr, min_capacity=kw.get("min_capacity", 0), backend="reference")
        assert_equal(d.positions, ref.positions, f"positions {kw}")
        assert_equal(d.counts, ref.counts, f"counts {kw}")


def test_gpt_refuses_expert_choice_with_one_line_error():
    with pytest.raises(ValueError, match="expert_choice is not causal") as exc:
        GPTConfig(vocab_size=32, max_seq_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                  moe=MoESettings(router="expert_choice"))
    assert "\n" not in str(exc.value)


def test_stats_drop_by_choice_rank_and_expertless_tokens():
    layer = _layer(capacity_factor=0.5, capacity_order="token")
    x = paddle.randn([64, 16])
    out = layer(x)
    pos = layer.route(x).dispatch.positions.numpy()
    miss = pos < 0
    np.testing.assert_allclose(out.stats.dropped_by_choice.numpy(), miss.mean(0), rtol=1e-6)
    assert float(out.stats.expertless_fraction) == pytest.approx(miss.all(1).mean())
    assert float(out.stats.dropped_fraction) == pytest.approx(miss.mean())


def test_routing_scalars_names_and_values():
    from_model = balance_biases(_layer(router="aux_free"))
    assert len(from_model) == 1 and not from_model[0].any()
    s = routing_scalars([1, 3], [np.array([4, 0, 2, 2]), np.array([1, 1, 1, 1])],
                        [np.array([0.0, 0.25]), np.array([0.5, 0.75])], [np.array([0.1, -0.1, 0.0, 0.0])] * 2)
    assert s["load_max_over_mean/layer1"] == pytest.approx(2.0)
    assert s["load_max_over_mean/layer3"] == pytest.approx(1.0)
    assert s["dropped_choice1/layer1"] == 0.25 and s["dropped_choice0/layer3"] == 0.5
    assert s["balance_bias_absmean/layer3"] == pytest.approx(0.05)
    assert s["balance_bias_range/layer1"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="2 demand vectors for 1 MoE layers"):
        routing_scalars([1], [np.ones(4), np.ones(4)])


def test_aux_free_bias_travels_through_the_inference_package(tmp_path):
    paddle.seed(0)
    model = GPTMoE(GPTConfig(vocab_size=64, max_seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64, moe_every=1,
                             moe=MoESettings(num_experts=4, router="aux_free")))
    bias = np.array([0.3, -0.1, 0.0, 0.2], np.float32)
    for layer in model.moe_layers():
        layer.router.balance_bias.set_value(paddle.to_tensor(bias))
    export_package(model, tmp_path / "pkg", graphs=False)
    served = build_skeleton(read_manifest(tmp_path / "pkg"))
    for layer in served.moe_layers():
        np.testing.assert_array_equal(layer.router.balance_bias.numpy(), bias)

