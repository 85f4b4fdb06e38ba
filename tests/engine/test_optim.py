"""Learning-rate schedule and optimizer partitioning by parameter class."""

import math

import numpy as np
import paddle
import pytest

from paddle_semoe.engine.config import OptimConfig
from paddle_semoe import ops
from paddle_semoe.engine.optim import FusedAdamW, MoEOptimizer, lr_at
from paddle_semoe.models.gpt import GPTConfig, GPTMoE
from paddle_semoe.moe import MoESettings
from tests._helpers import assert_close


def test_warmup_then_cosine_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_at(s, cfg, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 20) == pytest.approx(1.0)
    assert lr_at(12, cfg, 20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20, cfg, 20) == pytest.approx(0.1)
    assert lr_at(100, cfg, 20) == pytest.approx(0.1)
    lin = OptimConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="linear")
    assert lr_at(5, lin, 10) == pytest.approx(0.5)
    assert lr_at(3, OptimConfig(lr=0.5, warmup_steps=0, schedule="constant"), 10) == 0.5


def test_expert_parameters_get_their_own_optimizer():
    model = GPTMoE(GPTConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, moe_every=2, moe=MoESettings(num_experts=2)))
    opt = MoEOptimizer(model, OptimConfig())
    names = {id(p) for p in opt.expert_params}
    experts = {id(p) for n, p in model.named_parameters() if ".experts." in n}
    assert names == experts and len(experts) == 4
    assert not names & {id(p) for p in opt.dense_params}
    opt.set_lr(0.123)
    assert opt.dense.get_lr() == opt.expert.get_lr() == 0.123


def _twin_params(shapes, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        ps = [paddle.create_parameter(list(s), "float32") for s in shapes]
        for p, v in zip(ps, [rng.standard_normal(s).astype("float32") for s in shapes] if not out else [q.numpy() for q in out[0]]):
            p.set_value(v)
        out.append(ps)
    return out


@pytest.mark.parametrize("backend", ["custom", "reference"])
def test_fused_adamw_equals_paddle_adamw(backend):
    """Same parameters, moments and beta powers as Paddle's AdamW after several steps, with
    weight decay only on matrices; the state dict has the same keys."""
    shapes = [(3, 4), (5,), (70000,), (2, 3, 4)]
    ref_ps, fused_ps = _twin_params(shapes, seed=0)
    kw = dict(learning_rate=0.01, beta1=0.9, beta2=0.95, epsilon=1e-8, weight_decay=0.1)
    ref = paddle.optimizer.AdamW(parameters=ref_ps, apply_decay_param_fun=lambda n: n in {p.name for p in ref_ps if len(p.shape) >= 2}, **kw)
    fused = FusedAdamW(parameters=fused_ps, apply_decay_param_fun=lambda n: n in {p.name for p in fused_ps if len(p.shape) >= 2}, backend=backend, **kw)
    rng = np.random.default_rng(1)
    for _ in range(4):
        gs = [rng.standard_normal(s).astype("float32") for s in shapes]
        for ps in (ref_ps, fused_ps):
            sum((p * paddle.to_tensor(g)).sum() for p, g in zip(ps, gs)).backward()
        ref.step()
        fused.step()
        ref.clear_grad()
        fused.clear_grad()
    for a, b in zip(fused_ps, ref_ps):
        assert_close(a, b, rtol=1e-6, atol=1e-6, what=a.name)
    for pa, pb in zip(fused_ps, ref_ps):
        for acc in ("moment1", "moment2", "beta1_pow_acc", "beta2_pow_acc"):
            got, want = fused._get_accumulator_master(acc, pa), ref._get_accumulator_master(acc, pb)
            assert_close(got, want, rtol=1e-6, atol=1e-7, what=f"{acc} of {pa.name}")
    strip = lambda sd, ps: sorted(k.replace(p.name, f"p{i}") for k in sd for i, p in enumerate(ps) if k.startswith(p.name + "_"))  # noqa: E731
    assert strip(fused.state_dict(), fused_ps) == strip(ref.state_dict(), ref_ps), "same checkpoint keys"


def test_fused_adamw_folds_the_gradient_scale():
    """step(grad_scale=c) equals a step on gradients multiplied by c beforehand."""
    shapes = [(8, 8), (8,)]
    a_ps, b_ps = _twin_params(shapes, seed=3)
    a = FusedAdamW(learning_rate=0.1, parameters=a_ps, weight_decay=0.01)
    b = FusedAdamW(learning_rate=0.1, parameters=b_ps, weight_decay=0.01)
    rng = np.random.default_rng(4)
    gs = [rng.standard_normal(s).astype("float32") for s in shapes]
    sum((p * paddle.to_tensor(g)).sum() for p, g in zip(a_ps, gs)).backward()
    sum((p * paddle.to_tensor(g * 0.25)).sum() for p, g in zip(b_ps, gs)).backward()
    a.step(grad_scale=0.25)
    b.step()
    for x, y in zip(a_ps, b_ps):
        assert_close(x, y, rtol=1e-6, atol=1e-7, what="scaled in the kernel == scaled before")


def test_squared_norms_match_paddle():
    ts = [paddle.randn([3, 5]), paddle.randn([4097]), paddle.zeros([0])]
    got = ops.squared_norms(ts, backend="custom")
    want = ops.squared_norms(ts, backend="reference")
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must be float32"):
        ops.squared_norms([paddle.randn([3]).astype("float64")], backend="custom")


def test_adamw_step_names_a_wrong_dtype_in_any_list():
    p, g = paddle.randn([4]), paddle.randn([4]).astype("float64")
    m, b = paddle.zeros([4]), paddle.ones([1])
    with pytest.raises(Exception, match=r"'grads'\[0\] must be a float32 CPU tensor, got float64"):
        ops.adamw_step([p], [g], [m], [m.clone()], [b], [b.clone()], lr=0.1, beta1=0.9, beta2=0.99,
                       epsilon=1e-8, weight_decay=0.0, decay_mask=[True], backend="custom")


def test_adamw_step_rejects_mismatched_lists():
    p = paddle.randn([4])
    with pytest.raises(ValueError, match="'moment1' holds 0 entries"):
        ops.adamw_step([p], [p], [], [p], [p], [p], lr=0.1, beta1=0.9, beta2=0.99, epsilon=1e-8,
                       weight_decay=0.0, decay_mask=[True])

