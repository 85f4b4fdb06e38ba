"""Shared test setup: deterministic Paddle, quiet logs, compiled ops required (no silent fallback)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("SEMOE_OPS", "custom")  # a broken build fails the tests instead of falling back

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    paddle.seed(1234)
    np.random.seed(1234)
    yield


@pytest.fixture(scope="session", autouse=True)
def _compiled_ops():
    """Build (or load) the custom ops once, before any multi-process test starts workers:
    a worker that compiled for ~20 s inside a Gloo collective would hit Gloo's fixed timeout."""
    from paddle_semoe import ops

    ops.resolve_backend("custom")
    yield
