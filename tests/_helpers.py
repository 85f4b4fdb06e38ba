"""Assertions shared by the tests."""

import numpy as np


def to_numpy(t):
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, what=""):
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=what)


def assert_equal(actual, expected, what=""):
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    np.testing.assert_array_equal(a, e, err_msg=what)


def run_child_on_threads(code: str, threads: int, expect_last: str, timeout: int = 600) -> None:
    """Run ``python -c code`` from the repository root with OMP/MKL thread counts set (the
    compiled kernels fix theirs at process start) and assert it exits 0 with its output ending
    in ``expect_last``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), GLOG_minloglevel="2")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().endswith(expect_last), proc.stdout[-2000:]
