"""The ops build: a failed compile becomes OpsBuildError (``auto`` falls back to the reference);
Ctrl-C and exits during the build propagate instead of being swallowed into the fallback."""

import functools

import pytest
from paddle.utils import cpp_extension

from paddle_semoe import ops
from paddle_semoe.ops import _build


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty build cache and no loaded library, so the next load runs cpp_extension.load."""
    monkeypatch.setenv("SEMOE_OPS_CACHE", str(tmp_path / "cache"))
    # a fresh memo for this test; the real one (holding the already loaded library) comes back
    # afterwards: loading the same op library twice into one process breaks its op registry
    monkeypatch.setattr(ops, "_load_library", functools.lru_cache(maxsize=1)(ops._load_library.__wrapped__))
    yield monkeypatch


def _raising(exc):
    def load(**kwargs):
        raise exc

    return load


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3)], ids=["ctrl-c", "exit"])
def test_interrupt_during_the_build_propagates(fresh_build, exc):
    fresh_build.setattr(cpp_extension, "load", _raising(exc))
    with pytest.raises(type(exc)):
        _build.build_and_load()
    with pytest.raises(type(exc)):  # not swallowed into the reference fallback
        ops.resolve_backend("auto")


def test_compile_error_is_an_ops_build_error_and_auto_falls_back(fresh_build):
    fresh_build.setattr(cpp_extension, "load", _raising(RuntimeError("Failed to run command: g++ ... error")))
    with pytest.raises(_build.OpsBuildError, match="building the custom ops failed: Failed to run command"):
        _build.build_and_load()
    with pytest.raises(_build.OpsBuildError, match="building the custom ops failed"):
        ops.resolve_backend("custom")
    assert ops.resolve_backend("auto") is None  # the reference path, with one loud warning
