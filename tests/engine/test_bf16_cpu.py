"""bfloat16 on CPU: ``amp.enabled=true, amp.dtype=bfloat16`` runs the compiled GEMMs on bf16
operands (float32 accumulation, float32 weights, gradients and AdamW states).

Tolerance of bf16 against float32: each GEMM operand is rounded to 8 significant bits (unit
roundoff u = 2^-8 = 3.9e-3), so a product carries a relative error up to 2u; over a sum of K
products with independent rounding the errors partly cancel, and the measured relative error
of a whole output or gradient tensor (Frobenius norm of the difference over the norm of the
float32 result) is ~2e-3 to 6e-3 here. The asserts allow 2e-2 (5u) per tensor, and require the
difference to be non-zero (bf16 really ran). Routing is computed in float32 by Paddle, so a
single MoE layer routes identically in both precisions.
"""

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_semoe import ops
from paddle_semoe.comm import Topology
from paddle_semoe.config import load_config
from paddle_semoe.engine import amp
from paddle_semoe.engine.amp import configure_cpu_gemms, cpu_gemm_mode, cpu_gemm_precision, cpu_has_native_bf16
from paddle_semoe.engine.config import AmpConfig, TrainConfig
from paddle_semoe.engine.distributed import DistContext, check_parallel_support
from paddle_semoe.engine.trainer import Trainer
from paddle_semoe.moe import MoEConfig, MoELayer

from tests.engine.test_trainer_local import CONFIG

BF16_REL_TOL = 2e-2  # per tensor, relative Frobenius error (module docstring)

needs_native_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no AVX512-BF16 / AMX-BF16")


@pytest.fixture(autouse=True)
def _float32_after():
    yield
    ops.set_cpu_gemm_precision("float32")


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _moe_layer_run(x0: paddle.Tensor) -> dict[str, np.ndarray]:
    """Output and every gradient (input and parameters) of one MoE layer, fixed weights."""
    paddle.seed(0)
    layer = MoELayer(MoEConfig(d_model=64, d_ff=256, num_experts=4, gate="topk", top_k=2, capacity_factor=1.25,
                               ops_backend="custom"))
    x = x0.clone()
    x.stop_gradient = False
    out = layer(x)
    (out.y * out.y).mean().backward()
    got = {"y": out.y.numpy(), "grad_x": x.grad.numpy()}
    for name, p in layer.named_parameters():
        if p.grad is not None:
            got[f"grad_{name}"] = p.grad.numpy()
    return got


@needs_native_bf16
def test_moe_layer_forward_and_gradients_in_bf16_match_float32():
    paddle.seed(1)
    x0 = paddle.randn([256, 64])
    ref = _moe_layer_run(x0)
    with cpu_gemm_precision(cpu_gemm_mode(AmpConfig(enabled=True, dtype="bfloat16"))) as got_precision:
        assert got_precision == "bfloat16_ffn"
        got = _moe_layer_run(x0)
    assert set(got) == set(ref) and any(k.endswith("w1") for k in got), sorted(got)
    for name in ref:
        err = _rel_err(got[name], ref[name])
        assert err < BF16_REL_TOL, f"{name}: relative error {err:.2e} >= {BF16_REL_TOL}"
    assert _rel_err(got["y"], ref["y"]) > 1e-5, "the expert GEMMs must have run in bfloat16"
    # back to float32 after the block: bit-identical to the first float32 run
    np.testing.assert_array_equal(_moe_layer_run(x0)["y"], ref["y"])


def _trainer(tmp_path, *overrides) -> Trainer:
    cfg = load_config(TrainConfig, CONFIG, ["parallel.ep_degree=1", f"train.output_dir={tmp_path}", *overrides])
    return Trainer(cfg, DistContext(1, 0, cfg.parallel.resolve(1), Topology.single()))


def _loss_and_grads(t: Trainer, batch) -> tuple[float, dict[str, np.ndarray]]:
    loss = float(t.accumulate_gradients(batch).lm_loss)
    return loss, {n: p.grad.numpy() for n, p in t.model.named_parameters() if p.grad is not None}


@needs_native_bf16
@pytest.mark.parametrize("cpu_gemms,precision", [("ffn", "bfloat16_ffn"), ("all", "bfloat16")])
def test_the_amp_switch_runs_the_model_in_bf16_close_to_float32(tmp_path, cpu_gemms, precision):
    """The trainer sets the GEMM precision from the config; the whole model's loss and every
    gradient stay within the bf16 tolerance of float32; parameters stay float32."""
    ref_t = _trainer(tmp_path / "fp32")
    assert ref_t.cpu_gemm_precision == "float32"
    batch = next(ref_t.batcher)
    ref_loss, ref_grads = _loss_and_grads(ref_t, batch)

    t = _trainer(tmp_path / "bf16", "amp.enabled=true", "amp.dtype=bfloat16", f"amp.cpu_gemms={cpu_gemms}")
    assert t.cpu_gemm_precision == precision
    assert all(p.dtype == paddle.float32 for p in t.model.parameters()), "master weights stay float32"
    loss, grads = _loss_and_grads(t, batch)
    assert loss != ref_loss and abs(loss - ref_loss) / ref_loss < 1e-3, (loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        err = _rel_err(grads[name], ref_grads[name])
        assert err < BF16_REL_TOL, f"{name}: relative error {err:.2e} >= {BF16_REL_TOL}"


def test_configure_cpu_gemms_per_config():
    assert configure_cpu_gemms(AmpConfig(enabled=False)) == "float32"
    if cpu_has_native_bf16():
        try:
            assert configure_cpu_gemms(AmpConfig(enabled=True, dtype="bfloat16")) == "bfloat16_ffn"
            assert configure_cpu_gemms(AmpConfig(enabled=True, dtype="bfloat16", cpu_gemms="all")) == "bfloat16"
            assert configure_cpu_gemms(AmpConfig(enabled=False)) == "float32"  # AMP off resets float32
        finally:
            configure_cpu_gemms(AmpConfig(enabled=False))
    with pytest.raises(ValueError, match="float16 is GPU only"):
        configure_cpu_gemms(AmpConfig(enabled=True, dtype="float16"))
    with pytest.raises(ValueError, match="cpu_gemms must be one of"):
        AmpConfig(enabled=True, cpu_gemms="attention")


def test_no_native_bf16_falls_back_to_float32_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(amp, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="paddle_semoe.engine.amp"):
        assert configure_cpu_gemms(AmpConfig(enabled=True, dtype="bfloat16")) == "float32"
        assert configure_cpu_gemms(AmpConfig(enabled=True, dtype="bfloat16")) == "float32"
        with cpu_gemm_precision("bfloat16") as got:  # another precision: its own warning
            assert got == "float32"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one per asked precision, not one per call
    assert "no native bfloat16" in warnings[0] and "falling back to float32" in warnings[0]


def test_cpuinfo_flags_are_parsed(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu avx512f\n")
    assert not cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bf16(info)
    info.write_text("flags\t\t: amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16(info)
    assert not cpu_has_native_bf16(tmp_path / "missing")


@pytest.mark.parametrize(
    "overrides,error",
    [
        (["amp.enabled=true", "amp.dtype=bfloat16"], None),
        (["amp.enabled=true", "amp.dtype=bfloat16", "amp.cpu_gemms=all"], None),
        (["amp.enabled=false", "amp.dtype=float16"], None),
        (["amp.enabled=true", "amp.dtype=float16"], "amp.dtype=float16 needs a GPU"),
        (["amp.enabled=true", "amp.dtype=bfloat16", "amp.level=O2"], "amp.level=O2 casts the parameters"),
    ],
)
def test_the_cpu_amp_check(overrides, error):
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        pytest.skip("the CPU refusals apply to CPU-only runs")
    cfg = load_config(TrainConfig, CONFIG, ["parallel.ep_degree=1", *overrides])
    if error is None:
        assert check_parallel_support(cfg, 1).ep_degree == 1
    else:
        with pytest.raises(ValueError, match=error):
            check_parallel_support(cfg, 1)


def _bench_moe():
    tool = Path(__file__).resolve().parents[2] / "tools" / "bench_moe.py"
    spec = importlib.util.spec_from_file_location("bench_moe", tool)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_moe_times_the_custom_path_in_both_dtypes(tmp_path, capsys, monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # the tool pins them: restore after
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    bench = _bench_moe()
    out = tmp_path / "bench.json"
    report = bench.main(["--d-model", "32", "--d-ff", "64", "--experts", "4", "--tokens", "64", "--steps", "1",
                         "--warmup", "0", "--threads", "1", "--paths", "custom,reference",
                         "--dtypes", "float32,bfloat16", "--json", str(out)])
    assert list(report["results"]) == ["custom", "custom-bf16", "reference"]
    bf16 = "bfloat16_ffn" if cpu_has_native_bf16() else "float32"
    assert [v["gemm_precision"] for v in report["results"].values()] == ["float32", bf16, "float32"]
    assert json.loads(out.read_text())["config"]["dtypes"] == ["float32", "bfloat16"]
    table = capsys.readouterr().out
    assert "custom-bf16" in table and "vs custom" in table
    assert ops.set_cpu_gemm_precision("float32") == "float32"
    with pytest.raises(SystemExit):
        bench.parse_args(["--dtypes", "float16"])
