"""Sharded dense parameters (horizontal prefetch) on one rank: the update, the hooks, the state."""

import numpy as np
import paddle

from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings
from paddle_semoe.params import param_class
from paddle_semoe.storage.adamw import AdamWHyper, adamw_update_, step_scalars
from paddle_semoe.storage.dense_shard import build_sharded_dense

CFG = GPTConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8, moe_every=2, moe=MoESettings(num_experts=2))
H = AdamWHyper()


def _model_with_grads(seed=0):
    paddle.seed(seed)
    model = GPTMoE(CFG)
    x = paddle.to_tensor(np.random.default_rng(seed).integers(0, 256, size=(2, 8)))
    model(x, x).loss.backward()
    return model


def test_units_cover_every_dense_parameter_once_in_forward_order():
    model = _model_with_grads()
    sd = build_sharded_dense(model, [0], 0, H)
    assert [u.name for u in sd.units] == ["model", "blocks.0", "blocks.1"]
    dense = {id(p) for p in model.parameters() if param_class(p) != "expert"}
    owned = [id(p) for p in sd.params]
    assert sorted(owned) == sorted(dense) and len(owned) == len(set(owned))
    for u in sd.units:  # one rank owns everything
        assert (u.lo, u.hi) == (0, u.numel) and u.m.size == u.numel


def test_step_is_the_numpy_adamw_on_every_dense_tensor_and_state_round_trips():
    model = _model_with_grads()
    sd = build_sharded_dense(model, [0], 0, H)
    before = {id(p): (p.numpy().copy(), p.grad.numpy().copy()) for p in sd.params}
    sd.step(1e-2)
    s = step_scalars(H, 1e-2, 1)
    for p in sd.params:
        w, g = before[id(p)]
        w, m, v = w.copy(), np.zeros_like(w), np.zeros_like(w)
        adamw_update_(w, m, v, g, s, decay=len(p.shape) >= 2)
        np.testing.assert_array_equal(p.numpy(), w, err_msg=p.name)
    state = sd.state_dict()
    other_model = _model_with_grads()
    other = build_sharded_dense(other_model, [0], 0, H)
    # checkpoints go through structured names (io/model_state.py): translate the tensor names
    rename = {p.name: q.name for (_, p), (_, q) in zip(model.named_parameters(), other_model.named_parameters())}
    suffixes = ("_moment1_0", "_moment2_0", "_lazy_step_0")
    translated = {}
    for k, v in state.items():
        suf = next(x for x in suffixes if k.endswith(x))
        translated[rename[k[: -len(suf)]] + suf] = v
    other.load_state_dict(translated)
    assert other.t == 1
    for a, b in zip(sd.units, other.units):
        np.testing.assert_array_equal(a.m, b.m)
        np.testing.assert_array_equal(a.v, b.v)
    assert sd.interval_scalars()["dense_gather_wait_s_per_step"] == 0.0  # nothing to gather on one rank
