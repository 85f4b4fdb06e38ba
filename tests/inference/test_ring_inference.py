"""Ring-memory inference: equality with all-resident serving, slot safety, measured budgets,
corrupt packages, the Paddle Inference path, export from a checkpoint."""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_semoe.inference.export import export_package, model_from_checkpoint
from paddle_semoe.inference.package import PackageError, read_manifest
from paddle_semoe.inference.predictor import PaddleInferenceModel
from paddle_semoe.inference.ring import slots_for_budget
from paddle_semoe.inference.runner import InferenceModel, ServeConfig
from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings

N_MOE = 5


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    paddle.seed(11)
    cfg = GPTConfig(d_model=32, n_layers=6, n_heads=4, d_ff=64, max_seq_len=48, moe_every=1,
                    moe=MoESettings(num_experts=4, top_k=2))
    model = GPTMoE(cfg)
    # make the model's greedy output non-trivial: larger weights than the init
    for p in model.parameters():
        p.set_value(p * 8.0 if len(p.shape) >= 2 else p)
    # blocks 0..5 all MoE except make block 2 dense to cover mixed stacks
    return export_package(_with_dense_block(model), tmp_path_factory.mktemp("pkg") / "pkg")


def _with_dense_block(model: GPTMoE) -> GPTMoE:
    cfg = model.config
    mixed = GPTMoE(GPTConfig(**{**cfg.__dict__, "moe_every": 1}))
    mixed.set_state_dict(model.state_dict())
    return mixed


def _prompts(B=3, P=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (B, P)).astype(np.int64)


def _generate(manifest, serve, new=12, trace=False):
    m = InferenceModel.load(manifest, serve, trace=trace)
    try:
        return m.generate(_prompts(), new), m
    finally:
        m.close()


def test_ring_every_k_equals_resident_bit_for_bit(package):
    man = read_manifest(package)
    assert len(man.sections) == N_MOE + 1  # moe_every=1 over 6 blocks
    ref, _ = _generate(man, ServeConfig(mode="resident", source="host"))
    for k in range(1, len(man.sections) + 1):
        got, m = _generate(man, ServeConfig(mode="ring", num_slots=k, source="disk"))
        np.testing.assert_array_equal(got.tokens, ref.tokens, err_msg=f"ring K={k}")
    naive, _ = _generate(man, ServeConfig(mode="naive", source="disk", direct_io=False))
    np.testing.assert_array_equal(naive.tokens, ref.tokens)
    # and logits, not only argmax tokens
    a = InferenceModel.load(man, ServeConfig(mode="resident", source="host"))
    b = InferenceModel.load(man, ServeConfig(mode="ring", num_slots=2, source="disk"))
    la, _ = a.forward(paddle.to_tensor(_prompts()))
    lb, _ = b.forward(paddle.to_tensor(_prompts()))
    a.close(), b.close()
    np.testing.assert_array_equal(la.numpy(), lb.numpy())


def test_no_slot_is_computed_on_before_its_load_or_overwritten_in_use(package):
    man = read_manifest(package)
    _, m = _generate(man, ServeConfig(mode="ring", num_slots=2, source="disk"), trace=True)
    events = sorted(m.experts.trace, key=lambda e: e[3])
    assert events, "trace is empty"
    state: dict[int, tuple[str, int]] = {}  # slot -> (state, layer)
    computed = 0
    for kind, layer, slot, _t in events:
        st, lay = state.get(slot, ("empty", -1))
        if kind == "load_start":
            assert st in ("empty", "released"), f"slot {slot} reloaded while {st} (layer {lay})"
            state[slot] = ("loading", layer)
        elif kind == "load_end":
            assert (st, lay) == ("loading", layer)
            state[slot] = ("ready", layer)
        elif kind == "compute_start":
            assert (st, lay) == ("ready", layer), f"layer {layer} computed on slot {slot} in state {st} of layer {lay}"
            state[slot] = ("busy", layer)
            computed += 1
        elif kind == "compute_end":
            assert (st, lay) == ("busy", layer)
            state[slot] = ("released", layer)
    assert computed == len(man.sections) * 12  # prefill + 11 decode steps, every MoE layer each


def test_resident_expert_bytes_never_exceed_the_budget_measured(tmp_path):
    paddle.seed(3)  # experts of ~1 MiB per layer, so expert memory dominates what numpy holds
    model = GPTMoE(GPTConfig(d_model=64, n_layers=4, n_heads=4, d_ff=512, max_seq_len=48, moe_every=1,
                             moe=MoESettings(num_experts=4)))
    man = read_manifest(export_package(model, tmp_path / "pkg", graphs=False))
    budget = int(2.5 * man.max_section_bytes)
    assert slots_for_budget(man, budget) == 2
    # measure what numpy actually allocates (slots are numpy buffers, so tracemalloc sees them)
    tracemalloc.start(25)
    m = InferenceModel.load(man, ServeConfig(mode="ring", budget_bytes=budget, source="disk"))
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*inference/ring.py", all_frames=True)])
    expert_alloc = sum(stat.size for stat in snap.statistics("filename"))
    tracemalloc.reset_peak()
    level, _ = tracemalloc.get_traced_memory()
    m.generate(_prompts(), 8)
    _, peak = tracemalloc.get_traced_memory()
    m.close()
    tracemalloc.stop()
    held = m.experts.resident_expert_bytes()
    assert held == 2 * man.max_section_bytes <= budget
    # the ring's allocations (its two slots, with alignment slack) are all the expert memory it holds
    assert held <= expert_alloc <= budget, (expert_alloc, budget)
    # serving allocates no further expert-sized memory: slots are filled in place
    assert peak - level < man.max_section_bytes // 2, (peak - level, man.max_section_bytes)
    with pytest.raises(ValueError, match="below one MoE layer"):
        slots_for_budget(man, man.max_section_bytes - 1)


def test_corrupt_or_missing_section_is_refused_naming_the_file(package, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(package, bad)
    section = bad / read_manifest(bad).sections[1].file
    data = bytearray(section.read_bytes())
    data[100] ^= 0xFF
    section.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=f"{section.name} is corrupt"):
        read_manifest(bad)
    section.unlink()
    with pytest.raises(PackageError, match=f"missing: .*{section.name}"):
        read_manifest(bad)
    # a section altered after verification is not served either
    ok = tmp_path / "ok"
    shutil.copytree(package, ok)
    man = read_manifest(ok)
    m = InferenceModel.load(man, ServeConfig(mode="naive", source="disk", direct_io=False))
    target = ok / man.sections[0].file
    target.write_bytes(target.read_bytes()[:-4096])
    with pytest.raises(PackageError, match=f"{target.name} changed after it was verified"):
        m.generate(_prompts(), 2)
    m.close()


def test_paddle_inference_path_equals_dygraph(package):
    man = read_manifest(package)
    dy = InferenceModel.load(man, ServeConfig(mode="resident", source="host"))
    pi = PaddleInferenceModel(man, ServeConfig(mode="ring", num_slots=2, source="disk"))
    x = _prompts()
    ld, _ = dy.forward(paddle.to_tensor(x))
    lp = pi.forward(x)
    np.testing.assert_allclose(lp, ld.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(pi.generate(x, 6).tokens, dy.generate(x, 6).tokens)
    # the graphs' key/value caches: prefill then one token per step gives the full pass's logits
    head, caches = pi.step(x[:, :4], pi.empty_caches(x.shape[0]))
    assert caches[0][0].shape[2] == 4
    tail = []
    for t in range(4, x.shape[1]):
        logits, caches = pi.step(x[:, t : t + 1], caches)
        tail.append(logits)
    np.testing.assert_allclose(np.concatenate([head, *tail], axis=1), lp, rtol=1e-5, atol=1e-5)
    assert pi.generate(x, 6).forward_tokens == x.size + 5 * x.shape[0]  # the prompt once, then 1 token per step
    dy.close(), pi.close()


def test_export_from_a_checkpoint_serves_the_trained_model(tmp_path):
    """Train 2 steps in-process, export the checkpoint, serve it: same logits as the model."""
    from paddle_semoe.config import load_config
    from paddle_semoe.engine.config import TrainConfig
    from paddle_semoe.engine.distributed import DistContext
    from paddle_semoe.engine.trainer import Trainer
    from paddle_semoe.comm import Topology

    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[1] / "assets" / "gpt_moe_test.yaml",
                      ["parallel.ep_degree=1", "train.max_steps=2", f"train.output_dir={tmp_path}/run", "train.eval_every=2"])
    ctx = DistContext(1, 0, cfg.parallel.resolve(1), Topology.single())
    trainer = Trainer(cfg, ctx)
    trainer.fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    model = model_from_checkpoint(ckpt)
    for (n, a), (_, b) in zip(model.named_parameters(), trainer.model.named_parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=n)
    pkg = export_package(model, tmp_path / "pkg", graphs=False)
    served = InferenceModel.load(read_manifest(pkg), ServeConfig(mode="ring", num_slots=1, source="disk"))
    x = _prompts(2, 5)
    ls, _ = served.forward(paddle.to_tensor(x))
    served.close()
    # the training model routes with capacity in eval mode; with eval_capacity_factor=E/k no drops
    model.eval()
    np.testing.assert_allclose(ls.numpy(), model(paddle.to_tensor(x)).logits.numpy(), rtol=1e-5, atol=1e-5)
