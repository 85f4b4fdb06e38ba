"""Expert-choice routing in the UFO encoder (``model.moe_router=expert_choice``): each expert
takes exactly c tokens of every image; the output and the gradients equal an independent NumPy
computation; the elastic path (subset models, sharded gradient sync) stays exact; bad values
are refused in one line."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_semoe.comm import SimulatedWorld
from paddle_semoe.config import load_config
from paddle_semoe.elastic.groups import TaskGroups
from paddle_semoe.elastic.planner import plan_load_aware, plan_naive
from paddle_semoe.elastic.sync import ElasticGradSync
from paddle_semoe.models.ufo import ExpertChoiceMoE, UFOConfig, UFOModel, init_by_name
from paddle_semoe.params import param_class, task_of

from tests.elastic import _ufo_problem as up
from ufo_example.config import UFOJobConfig

ROOT = Path(__file__).resolve().parents[2]
EC_CFG = dataclasses.replace(up.CFG, moe_router="expert_choice", num_experts=4, top_k=2, capacity_factor=1.0)


def _erf(a: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(a)


def _layer(E: int, c: int, D: int = 8, F: int = 12, seed: int = 5) -> ExpertChoiceMoE:
    paddle.seed(seed)
    layer = ExpertChoiceMoE(D, F, E, c, "gelu", None, "auto")
    init_by_name(layer, seed, 0.5)
    rng = np.random.default_rng(seed)  # non-zero biases, so the reference checks them too
    for e in layer.experts:
        e.b1.set_value(rng.normal(0, 0.3, e.b1.shape).astype(np.float32))
        e.b2.set_value(rng.normal(0, 0.3, e.b2.shape).astype(np.float32))
    return layer


def _weights(layer: ExpertChoiceMoE) -> dict[str, np.ndarray]:
    st = lambda k: np.stack([getattr(e, k).numpy() for e in layer.experts]).astype(np.float64)  # noqa: E731
    return {"W": layer.router.weight.numpy().astype(np.float64), "w1": st("w1"), "b1": st("b1"), "w2": st("w2"), "b2": st("b2")}


def _numpy_expert_choice(x_NSD: np.ndarray, w: dict[str, np.ndarray], c: int, g_NSD: np.ndarray):
    """Independent float64 reference: (y, chosen mask [N, S, E], dL/dW, dL/dw2) for L = sum(y * g)."""
    N, S, D = x_NSD.shape
    E = w["W"].shape[1]
    x = x_NSD.astype(np.float64)
    logits = x @ w["W"]  # [N, S, E]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    chosen = np.zeros((N, S, E), bool)
    for n in range(N):
        for e in range(E):
            order = sorted(range(S), key=lambda s: (-p[n, s, e], s))  # best score first, ties: lower index
            chosen[n, order[:c], e] = True
    y = np.zeros_like(x)
    dp = np.zeros_like(p)
    dw2 = np.zeros_like(w["w2"])
    for e in range(E):
        pre = x @ w["w1"][e] + w["b1"][e]
        h = 0.5 * pre * (1.0 + _erf(pre / math.sqrt(2.0)))  # exact GELU
        f = h @ w["w2"][e] + w["b2"][e]  # [N, S, D]
        m = chosen[..., e]
        y += np.where(m[..., None], p[..., e:e + 1] * f, 0.0)
        dp[..., e] = np.where(m, (f * g_NSD).sum(-1), 0.0)
        coef = np.where(m, p[..., e], 0.0)[..., None]  # [N, S, 1]
        dw2[e] = np.einsum("nsf,nsd->fd", h, coef * g_NSD)
    dlogits = p * (dp - (p * dp).sum(-1, keepdims=True))
    dW = np.einsum("nsd,nse->de", x, dlogits)
    return y, chosen, dW, dw2


@pytest.mark.parametrize("N,S,E,c", [(3, 9, 4, 3), (2, 5, 3, 5), (4, 7, 6, 1)])
def test_each_expert_takes_exactly_c_tokens_of_every_image(N, S, E, c):
    layer = _layer(E, c)
    x = paddle.to_tensor(np.random.default_rng(N * S).normal(size=(N, S, 8)).astype(np.float32))
    r = layer.route(x)
    assert r.counts.numpy().tolist() == [N * c] * E
    pos = r.positions.numpy().reshape(N, S, E)
    assert ((pos >= 0).sum(axis=1) == c).all(), "every expert takes exactly c tokens of every image"
    # rows are a permutation of 0..R-1, expert-major, and each row holds the token it names
    R = E * N * c
    assert sorted(pos[pos >= 0].tolist()) == list(range(R))
    tok = r.tokens.numpy()
    for n, s, e in zip(*np.nonzero(pos >= 0)):
        row = pos[n, s, e]
        assert tok[row] == n * S + s and row // (N * c) == e
    _, chosen, _, _ = _numpy_expert_choice(x.numpy(), _weights(layer), c, np.zeros((N, S, 8)))
    np.testing.assert_array_equal(pos >= 0, chosen)


def test_ties_go_to_the_lower_token_index():
    layer = _layer(E=2, c=2)
    x = paddle.zeros([1, 5, 8])  # every score ties
    pos = layer.route(x).positions.numpy()
    assert (pos[:2] >= 0).all() and (pos[2:] < 0).all()


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_output_and_gradients_equal_an_independent_numpy_computation(backend):
    N, S, E, c = 3, 9, 4, 2  # 8 slots for 9 tokens: some token gets no expert
    layer = _layer(E, c)
    layer.backend = None if backend == "auto" else backend
    rng = np.random.default_rng(1)
    x_np = rng.normal(size=(N, S, 8)).astype(np.float32)
    g_np = rng.normal(size=(N, S, 8))
    x = paddle.to_tensor(x_np, stop_gradient=False)
    y = layer(x)
    (y * paddle.to_tensor(g_np.astype(np.float32))).sum().backward()
    y_ref, chosen, dW, dw2 = _numpy_expert_choice(x_np, _weights(layer), c, g_np)
    assert (~chosen.any(-1)).any() and (chosen.sum(-1) > 1).any()  # the case has expert-less and multi-expert tokens
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-4, atol=1e-5)
    # gradients flow to the router (through the combine weights), the experts and the input
    np.testing.assert_allclose(layer.router.weight.grad.numpy(), dW, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.stack([e.w2.grad.numpy() for e in layer.experts]), dw2, rtol=1e-3, atol=1e-5)
    assert np.abs(layer.router.weight.grad.numpy()).max() > 1e-3
    assert x.grad is not None and np.isfinite(x.grad.numpy()).all() and np.abs(x.grad.numpy()).max() > 0


def test_ufo_model_with_expert_choice_blocks_trains():
    model = UFOModel(EC_CFG, up.HEADS, range(4))
    init_by_name(model, up.SEED, 0.2)
    moes = [b.moe for b in model.blocks if b.moe is not None]
    assert len(moes) == EC_CFG.n_layers and all(isinstance(m, ExpertChoiceMoE) for m in moes)
    # S = 5 tokens (4 patches + CLS), c = ceil(1.0 * 5 * 2 / 4) = 3
    assert EC_CFG.seq_len == 5 and EC_CFG.expert_capacity == 3 and moes[0].capacity == 3
    for name, p in model.named_parameters():  # the pool is shared by every task
        if ".moe." in name:
            assert task_of(p) is None, name
            assert param_class(p) == ("gate" if "router" in name else "expert"), name
    x, y = up.task_data(0)
    out = model(paddle.to_tensor(x), paddle.to_tensor(np.zeros(len(x), np.int32)))
    assert out.cls.shape == [len(x), EC_CFG.d_model] and out.use_task == []
    # an image's output does not depend on the other images of its batch (routing group = image)
    alone = model(paddle.to_tensor(x[2:3]), paddle.to_tensor(np.zeros(1, np.int32)))
    np.testing.assert_allclose(alone.cls.numpy(), out.cls.numpy()[2:3], rtol=1e-5, atol=1e-6)
    opt = paddle.optimizer.Adam(1e-2, parameters=model.parameters())
    losses = []
    for _ in range(8):
        out = model(paddle.to_tensor(x), paddle.to_tensor(np.zeros(len(x), np.int32)))
        loss = paddle.nn.functional.cross_entropy(model.head(0, out.cls), paddle.to_tensor(y))
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_subset_models_and_sharded_gradients_stay_exact_with_expert_choice():
    """The elastic guarantees hold: a subset model holds bit-identical parameters, and the
    gradients synced over a load-aware plan (digit's batch split over two ranks) equal the
    full-batch gradient of one process."""

    def build(hosted) -> UFOModel:
        m = UFOModel(EC_CFG, up.HEADS, list(hosted))
        init_by_name(m, up.SEED, 0.2)
        return m

    full = dict(build(range(4)).named_parameters())
    for n, p in build([2]).named_parameters():
        np.testing.assert_array_equal(p.numpy(), full[n].numpy(), err_msg=n)

    ref_model = build(range(4))
    up.local_objective(ref_model, plan_naive(up.LOADS, 1), 0).backward()
    ref = {n: p.grad.numpy() for n, p in ref_model.named_parameters() if p.grad is not None}
    assert any(".moe.router" in n for n in ref)
    plan = plan_load_aware(up.LOADS, 4)
    assert len(plan.task_ranks(0)) == 2  # digit's batch is split
    sim = SimulatedWorld(4, timeout_s=60)

    def rank_fn(r: int):
        model = build(plan.rank_tasks(r))
        named = list(model.named_parameters())
        sync = ElasticGradSync(named, plan, TaskGroups.from_handles(plan, r), sim.communicator(r))
        loss = up.local_objective(model, plan, r)
        if loss is not None:
            loss.backward()
        sync.reduce()
        return {n: p.grad.numpy() for n, p in named if p.grad is not None}

    for r, grads in enumerate(sim.run(rank_fn)):
        for name, g in grads.items():
            np.testing.assert_allclose(g, ref[name], rtol=2e-4, atol=2e-6, err_msg=f"rank {r} {name}")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(moe_router="topk"), "moe_router must be one of \\('task', 'expert_choice'\\), got 'topk'"),
        (dict(num_experts=0), "num_experts must be >= 1, got 0"),
        (dict(moe_router="expert_choice", num_experts=4, top_k=5), "top_k must be in \\[1, num_experts=4\\], got 5"),
        (dict(capacity_factor=0.0), "capacity_factor must be > 0, got 0.0"),
    ],
)
def test_config_errors_are_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as exc:
        UFOConfig(**kw)
    assert "\n" not in str(exc.value)


def test_shipped_expert_choice_config_loads():
    cfg = load_config(UFOJobConfig, ROOT / "ufo_example" / "configs" / "ufo_expert_choice_cpu.yaml")
    assert cfg.model.moe_router == "expert_choice" and cfg.model.num_experts == 4
    assert 1 <= cfg.model.expert_capacity <= cfg.model.seq_len
    # the cost model sees the expert-choice FFN: E * c rows per image instead of S
    task_cfg = dataclasses.replace(cfg.model, moe_router="task")
    assert cfg.model.flops_per_sample() != task_cfg.flops_per_sample()
