"""Shared experts (DeepSeekMoE) in the exported static graphs: the Paddle Inference path of a
model with ``num_shared_experts=1`` and fine-grained routed experts (expert ``d_ff`` a quarter
of the model's, k=4 of E=8) gives the training model's logits in every layer-granular expert
mode, and the dygraph serving runner gives them bit for bit in every mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_semoe.inference.export import export_package
from paddle_semoe.inference.package import PackageError, read_manifest
from paddle_semoe.inference.predictor import PaddleInferenceModel
from paddle_semoe.inference.runner import InferenceModel, ServeConfig
from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings

# the modes Paddle Inference serves (the expert cache serves routed experts only, through the runner)
PI_SERVES = {
    "resident": ServeConfig(mode="resident", source="host"),
    "ring1": ServeConfig(mode="ring", num_slots=1, source="disk", direct_io=False),
    "ring2": ServeConfig(mode="ring", num_slots=2, source="disk"),
    "naive": ServeConfig(mode="naive", source="host"),
}
RUNNER_SERVES = {**PI_SERVES, "cache3": ServeConfig(mode="cache", num_slots=3, source="disk", verify_reads=True)}


def _model() -> GPTMoE:
    paddle.seed(17)
    # blocks 1 and 3 are MoE, 0 and 2 dense (a mixed stack)
    cfg = GPTConfig(d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=32, moe_every=2,
                    moe=MoESettings(num_experts=8, top_k=4, d_ff=16, num_shared_experts=1, dropless=True))
    model = GPTMoE(cfg)
    for p in model.parameters():  # sharper routing and larger shared-expert outputs than the init
        p.set_value(p * 6.0 if len(p.shape) >= 2 else p)
    model.eval()
    model.set_eval_dropless(True)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[GPTMoE, Path]:
    model = _model()
    return model, export_package(model, tmp_path_factory.mktemp("pkg") / "pkg", graphs=True)


def _tokens(B=3, S=9, seed=2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (B, S)).astype(np.int64)


def test_graphs_carry_the_shared_experts(exported):
    model, pkg = exported
    man = read_manifest(pkg)
    assert [b["kind"] for b in man.graphs["blocks"]] == ["dense", "moe", "dense", "moe"]
    pi = PaddleInferenceModel(man, PI_SERVES["resident"])
    try:
        for kind, graph in pi.blocks:
            if kind == "moe":
                assert len(graph.outputs) == 8  # x_mid, k, v, rows, counts, weights, positions, shared
        assert pi.post is not None and len(pi.post.inputs) == 5
    finally:
        pi.close()
    # the shared experts' weights are dense parameters of the package, not expert sections
    names = set(np.load(pkg / "dense.npz").files)
    for i in (1, 3):
        assert {f"blocks.{i}.ffn.shared_experts.{w}" for w in ("w1", "b1", "w2", "b2")} <= names
    assert json.loads((pkg / "manifest.json").read_text())["model"]["moe"]["num_shared_experts"] == 1


def test_paddle_inference_equals_the_training_model_in_every_expert_mode(exported):
    model, pkg = exported
    man = read_manifest(pkg)
    x = _tokens()
    with paddle.no_grad():
        ref = model(paddle.to_tensor(x)).logits.numpy()
        # what the graphs would give without the shared experts: far from ref, so a graph that
        # dropped them could not pass the comparison below
        saved = {i: model.blocks[i].ffn.shared_experts.w2.numpy() for i in (1, 3)}
        for i in saved:
            model.blocks[i].ffn.shared_experts.w2.set_value(np.zeros_like(saved[i]))
            model.blocks[i].ffn.shared_experts.b2.set_value(np.zeros([32], np.float32))
        without = model(paddle.to_tensor(x)).logits.numpy()
        for i, w in saved.items():
            model.blocks[i].ffn.shared_experts.w2.set_value(w)
    assert np.abs(without - ref).max() > 1e-1
    for name, serve in PI_SERVES.items():
        pi = PaddleInferenceModel(man, serve)
        try:
            np.testing.assert_allclose(pi.forward(x), ref, rtol=1e-4, atol=1e-4, err_msg=name)
        finally:
            pi.close()
    # greedy generation through Paddle Inference equals the dygraph serving runner's
    pi = PaddleInferenceModel(man, PI_SERVES["ring1"])
    dy = InferenceModel.load(man, PI_SERVES["resident"])
    try:
        np.testing.assert_array_equal(pi.generate(x[:, :5], 5).tokens, dy.generate(x[:, :5], 5).tokens)
    finally:
        pi.close(), dy.close()


def test_dygraph_serving_runner_equals_the_training_model_bit_for_bit(exported):
    model, pkg = exported
    man = read_manifest(pkg)
    x = paddle.to_tensor(_tokens(seed=3))
    with paddle.no_grad():
        full = model(x)
        first = model(x[:, :5])
        rest = model(x[:, 5:], caches=first.caches)
    for name, serve in RUNNER_SERVES.items():
        served = InferenceModel.load(man, serve)
        try:
            logits, _ = served.forward(x)
            np.testing.assert_array_equal(logits.numpy(), full.logits.numpy(), err_msg=name)
            a, caches = served.forward(x[:, :5])
            b, _ = served.forward(x[:, 5:], caches)
            np.testing.assert_array_equal(a.numpy(), first.logits.numpy(), err_msg=f"{name} prefill")
            np.testing.assert_array_equal(b.numpy(), rest.logits.numpy(), err_msg=f"{name} cached decode")
        finally:
            served.close()


def test_predictor_refuses_graphs_whose_shared_outputs_and_inputs_disagree(exported, tmp_path):
    _, pkg = exported
    bad = tmp_path / "bad"
    shutil.copytree(pkg, bad)
    doc = json.loads((bad / "manifest.json").read_text())
    doc["graphs"]["moe_post"] = doc["graphs"]["head"]  # a recorded graph of another arity (1 input)
    (bad / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(PackageError, match="a moe_pre graph has 8 outputs but moe_post takes 1 inputs") as exc:
        PaddleInferenceModel(read_manifest(bad), PI_SERVES["resident"])
    assert "\n" not in str(exc.value)
