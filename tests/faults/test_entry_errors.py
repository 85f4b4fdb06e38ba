"""One error boundary per entry point: expected failures are one line and a non-zero status,
unexpected ones keep their traceback, Ctrl-C is never a failure; bad tool inputs and senseless
numeric config values are refused in one line."""

from __future__ import annotations

import errno
import importlib.util
import subprocess
import sys
from pathlib import Path

import paddle
import pytest

from paddle_semoe.comm.watchdog import CommError
from paddle_semoe.config import ConfigError, load_config
from paddle_semoe.engine.checkpoint import TrainingError
from paddle_semoe.engine.config import TrainConfig
from paddle_semoe.engine.launch_env import EXIT_INTERRUPTED, describe_failure, run_entry
from paddle_semoe.inference.export import export_package
from paddle_semoe.io.checkpoint import CheckpointError
from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "gpt_moe_tiny.yaml"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raiser(exc: BaseException):
    def main(_argv):
        raise exc
    return main


@pytest.mark.parametrize("exc, status, text", [
    (OSError(errno.ENOSPC, "No space left on device", "/ckpt/step_1.tmp/rank_0.npz"), 1,
     "error: disk full (No space left on device): /ckpt/step_1.tmp/rank_0.npz"),
    (CommError("all_gather 'checkpoint file records' on group [0, 1]: peer 1 is gone (Connection reset by peer)"), 1,
     "error: all_gather 'checkpoint file records' on group [0, 1]: peer 1 is gone (Connection reset by peer)"),
    (CheckpointError("checkpoint file /c/rank_00001.npz is corrupt"), 1, "error: checkpoint file /c/rank_00001.npz is corrupt"),
    (TrainingError("6 non-finite steps"), 1, "error: 6 non-finite steps"),
    (ConfigError("optim.lr: lr must be a finite number,\n got nan"), 2, "error: optim.lr: lr must be a finite number, got nan"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "x.yaml"), 2, "error: No such file or directory: x.yaml"),
])
def test_expected_failures_are_one_line(capsys, exc, status, text):
    assert run_entry(_raiser(exc), [], name="t") == status
    assert capsys.readouterr().err.splitlines() == [text]


def test_unexpected_errors_keep_their_traceback_and_ctrl_c_is_not_a_failure(capsys):
    assert describe_failure(KeyError("x")) is None
    with pytest.raises(KeyError):
        run_entry(_raiser(KeyError("x")), [])
    assert run_entry(_raiser(KeyboardInterrupt()), [], name="train") == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "train: interrupted"
    with pytest.raises(SystemExit):
        run_entry(_raiser(SystemExit(2)), [])


def test_keyboard_interrupt_in_a_tool_exits_130_without_traceback():
    code = ("import sys; sys.argv=['x']; from paddle_semoe.engine.launch_env import run_entry\n"
            "def main(a):\n    raise KeyboardInterrupt\nsys.exit(run_entry(main, name='x'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 130 and "Traceback" not in r.stderr and r.stderr.strip() == "x: interrupted"


# ----------------------------------------------------------------------------- tools/infer.py inputs
@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    paddle.seed(5)
    model = GPTMoE(GPTConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16, moe_every=1,
                             moe=MoESettings(num_experts=2, top_k=1)))
    return export_package(model, tmp_path_factory.mktemp("pkg") / "pkg", graphs=False)


@pytest.mark.parametrize("extra, fragment", [
    (["--prompt", ""], "prompt [0] '' is empty"),
    (["--prompt", "x" * 12, "--max-new-tokens", "8"], "prompt [0] has 12 tokens; with --max-new-tokens 8 it needs 20"),
    (["--modes", "warp"], "unknown serving mode 'warp'"),
    (["--modes", "ring:two"], "serving mode 'ring:two': the slot count must be an integer"),
    (["--modes", "ring:0"], "the slot count must be >= 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 0, got -3"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0"),
])
def test_infer_bad_input_is_one_line(package, capsys, extra, fragment):
    infer = _tool("infer")
    try:
        rc = infer.main(["--package", str(package), "--threads", "1", *extra])
    except SystemExit as stop:  # argparse's error: usage line + message, status 2
        rc = stop.code
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("usage:")]
    err = [line for line in err if line.strip() and not line.startswith(" ")]
    assert rc == 2
    assert len(err) == 1 and fragment in err[0], err


def test_infer_runs_on_good_input(package, capsys):
    assert _tool("infer").main(["--package", str(package), "--threads", "1", "--prompt", "ab", "--max-new-tokens", "3",
                                "--modes", "resident"]) == 0
    assert "resident" in capsys.readouterr().out


def test_compress_on_a_missing_checkpoint_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "tools/compress.py", "--checkpoint", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: checkpoint not found: {tmp_path / 'nope'}"
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- numeric config values
@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=.nan", "lr must be a finite number"),
    ("optim.lr=.inf", "lr must be a finite number"),
    ("optim.grad_clip=.nan", "grad_clip must be a finite number"),
    ("optim.eps=0", "eps must be positive"),
    ("optim.weight_decay=-0.1", "weight_decay must be >= 0"),
    ("parallel.comm_timeout_s=.inf", "comm_timeout_s must be a finite number"),
    ("parallel.bucket_mb=.nan", "bucket_mb must be a finite number"),
])
def test_senseless_numbers_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(TrainConfig, TINY, [override])
    assert "\n" not in str(info.value)


def test_train_tool_prints_a_config_error_in_one_line():
    r = subprocess.run([sys.executable, "tools/train.py", "-c", str(TINY), "-o", "optim.lr=.nan"],
                       capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "lr must be a finite number" in lines[0]
    assert "Traceback" not in r.stderr
