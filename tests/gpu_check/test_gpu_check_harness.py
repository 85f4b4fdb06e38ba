"""The gpu_check harness (tools/gpu_check) driven over the CPU kernels (--emulate-cpu):
every check passes on the CPU implementation, and planted bugs are caught."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from gpu_check import cases, check, native  # noqa: E402
from gpu_check import reference as ref  # noqa: E402


@pytest.fixture(scope="module")
def cpu_lib(tmp_path_factory) -> Path:
    return native.build_library("cpu", tmp_path_factory.mktemp("gpu_check_build"))


@pytest.fixture()
def shim(cpu_lib) -> native.Shim:
    return native.Shim(cpu_lib)  # a fresh binding: tests below patch its functions


def failures(suite: cases.Suite) -> list[str]:
    return [r.line() for r in suite.results if not r.ok]


def test_emulated_suite_passes_everywhere(shim):
    assert shim.emulated
    suite = cases.Suite(shim, seed=1234)
    cases.run_suite(suite, "small")
    assert not failures(suite), "\n".join(failures(suite))
    ops = {r.op for r in suite.results}
    assert ops == {"expert_count", "gate_dispatch", "gate_dispatch_grad", "combine",
                   "combine_grad", "bias_act_fwd", "act_bwd", "permute_row_blocks",
                   "a2a_exchange"}
    determinism = [r for r in suite.results if r.check.startswith("deterministic")]
    assert {r.op for r in determinism} == ops
    assert len(suite.results) > 300


def test_cli_writes_json_and_prints_table_last(cpu_lib, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = check.main(["--emulate-cpu", "--lib", str(cpu_lib), "--json", str(out), "--seed", "7"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["emulated"] is True
    assert report["checks_passed"] == report["checks_total"] > 0
    assert {t["op"] for t in report["timings"]} == {"gate_dispatch", "gate_dispatch_grad",
                                                    "combine", "combine_grad", "a2a_permute"}
    assert report["copy_bandwidth"]["gbps"] > 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("== gpu_check:")
    assert any("CPU EMULATION" in line for line in printed)
    assert printed[-1].startswith("a2a_permute")  # the table is the last thing printed


# ------------------------------------------------------------------ planted bugs are caught
def _patch(shim: native.Shim, name: str, after):
    """Replace shim.lib.<name> by a call of the original followed by after(args)."""
    orig = getattr(shim.lib, name)

    def patched(*args):
        rc = orig(*args)
        after(args)
        return rc

    setattr(shim.lib, name, patched)


def _edit(shim, address: int, dtype, count: int, fn) -> None:
    """Host-side edit of ``count`` elements at ``address`` (a shim pointer)."""
    a = np.empty(count, dtype=dtype)
    shim.lib.semoe_chk_d2h(a.ctypes.data, address, a.nbytes)
    fn(a)
    shim.lib.semoe_chk_h2d(address, a.ctypes.data, a.nbytes)


def _run_combine(shim, dtype="float32", T=20, K=2, D=8):
    suite = cases.Suite(shim, seed=3)
    pos = cases.synthetic_positions(suite, T, K, 2 * T * K, 0.2)
    cases.check_combine(suite, "planted", dtype, pos, 2 * T * K, D, repeat=True)
    return suite


def test_unwritten_output_element_is_caught(shim):
    def leave_last_unwritten(args):  # out = args[7], T = args[4], D = args[6]
        _edit(shim, args[7], np.uint8, 4 * args[4] * args[6],
              lambda a: a.__setitem__(slice(-4, None), cases.POISON_FLOAT))

    _patch(shim, "semoe_chk_combine", leave_last_unwritten)
    bad = failures(_run_combine(shim))
    assert any("out" in line and "outside tolerance" in line for line in bad), bad


def test_small_numeric_error_is_caught(shim):
    def scale(args):
        _edit(shim, args[7], np.float32, args[4] * args[6], lambda a: a.__imul__(1 + 1e-4))

    _patch(shim, "semoe_chk_combine", scale)
    assert failures(_run_combine(shim))


def test_nondeterminism_is_caught(shim):
    calls = []

    def flip_second_run(args):
        calls.append(1)
        if len(calls) == 2:
            _edit(shim, args[7], np.uint32, 1, lambda a: a.__ixor__(np.uint32(1)))

    _patch(shim, "semoe_chk_combine", flip_second_run)
    bad = failures(_run_combine(shim))
    assert any("deterministic" in line for line in bad), bad


@pytest.mark.parametrize("mutation", ["swap_positions", "dirty_tail_row", "counts_off_by_one"])
def test_dispatch_bugs_are_caught(shim, mutation):
    spec = cases.DispatchSpec(64, 16, 8, 2, 0.75, logits="skewed")

    def mutate(args):
        T, D, E, K = args[6], args[7], args[8], args[9]
        n_rows, rows, pos, counts = args[15], args[16], args[19], args[20]
        if mutation == "swap_positions":
            _edit(shim, pos, np.int32, T * K, lambda a: a.__setitem__(slice(0, 2), a[1::-1]))
        elif mutation == "dirty_tail_row":
            _edit(shim, rows + 4 * (n_rows - 1) * D, np.float32, D, lambda a: a.fill(1.0))
        else:
            _edit(shim, counts, np.int32, E, lambda a: a.__setitem__(0, a[0] + 1))

    _patch(shim, "semoe_chk_gate_dispatch", mutate)
    suite = cases.Suite(shim, seed=5)
    assert cases.check_gate_dispatch(suite, spec) is None  # downstream checks refused
    assert failures(suite)


def test_launch_error_is_reported(shim):
    suite = cases.Suite(shim, seed=0)
    bad = cases.DispatchSpec(4, 8, 2, 3)  # top_k > num_experts
    suite.guarded("gate_dispatch", bad.name(), cases.check_gate_dispatch, suite, bad)
    assert failures(suite) and "invalid argument" in failures(suite)[0]
    assert suite.broken is None


def test_bf16_rows_are_exact_copies(shim):
    suite = cases.Suite(shim, seed=11)
    d = cases.check_gate_dispatch(suite, cases.DispatchSpec(40, 24, 4, 2, 0.0, dtype="bfloat16"))
    assert d is not None and not failures(suite)
    np.testing.assert_array_equal(d.rows, ref.gather_rows(d.x, d.pos, d.n_rows))


def test_permute_bugs_are_caught(shim):
    def drop_last_row(args):  # dst = args[1], row_bytes = args[2], dst_start = args[4], B = args[5]
        B = args[5]
        if B == 0:
            return
        dst_start = np.ctypeslib.as_array(ctypes.cast(args[4], ctypes.POINTER(ctypes.c_int64)), (B + 1,))
        last = int(dst_start[B]) - 1
        if last >= int(dst_start[0]):
            _edit(shim, args[1] + last * args[2], np.uint8, args[2], lambda a: a.fill(cases.POISON_INT))

    _patch(shim, "semoe_chk_permute_row_blocks", drop_last_row)
    suite = cases.Suite(shim, seed=2)
    cases.check_permute_row_blocks(suite, 16, [3, 1, 4, 1, 5])
    assert any("differ" in line for line in failures(suite)), failures(suite)


@pytest.mark.parametrize("bug", ["swap_two_rows", "dirty_extra_row", "combine_padding"])
def test_simulated_exchange_bugs_are_caught(shim, bug):
    calls = []

    def mutate(args):  # out pointers = args[7], out_rows = args[8], row_bytes = args[9]
        P, inverse = args[1], args[5]
        outs = np.ctypeslib.as_array(ctypes.cast(args[7], ctypes.POINTER(ctypes.c_uint64)), (P,))
        rows = np.ctypeslib.as_array(ctypes.cast(args[8], ctypes.POINTER(ctypes.c_int64)), (P,))
        rb = args[9]
        calls.append(inverse)
        r = int(np.argmax(rows))
        n = int(rows[r])
        if bug == "swap_two_rows" and not inverse and n >= 3:
            _edit(shim, int(outs[r]), np.uint8, n * rb,
                  lambda a: a.__setitem__(slice(0, 2 * rb), np.roll(a[: 2 * rb], rb)))
        elif bug == "dirty_extra_row" and not inverse:
            _edit(shim, int(outs[r]) + (n - 1) * rb, np.uint8, rb, lambda a: a.fill(7))
        elif bug == "combine_padding" and inverse:
            _edit(shim, int(outs[r]) + (n - 1) * rb, np.uint8, rb, lambda a: a.fill(7))

    _patch(shim, "semoe_chk_a2a_simulate", mutate)
    suite = cases.Suite(shim, seed=4)
    cases.check_a2a_exchange(suite, 4, 2, 2, True, "uneven", 16)
    assert calls == [0, 1]
    bad = failures(suite)
    assert bad and all("a2a_exchange" in line for line in bad), bad


def test_simulated_exchange_reports_layout_errors(shim):
    suite = cases.Suite(shim, seed=0)
    cases.check_a2a_rejects_bad_node_size(suite)
    assert not failures(suite), failures(suite)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_shim_compiles_against_launcher_api(tmp_path):
    """shim.cu (the GPU side of the same C API) compiles against cuda_launchers.h."""
    proc = subprocess.run(
        ["nvcc", "-std=c++17", "-I", str(REPO / "custom_ops" / "include"), "-I",
         str(REPO / "tools" / "gpu_check"), "-gencode", "arch=compute_90,code=sm_90",
         "-Werror", "all-warnings", "-c", str(REPO / "tools" / "gpu_check" / "shim.cu"), "-o",
         str(tmp_path / "shim.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
