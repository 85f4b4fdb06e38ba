"""Ctrl-C during the custom-op build is an interrupt, not a build failure to fall back from."""

from __future__ import annotations

import signal
import subprocess

import pytest

from paddle_semoe.ops import _build


def _fail_with(status: int):
    def load(**_kwargs):
        try:
            raise subprocess.CalledProcessError(status, "python setup.py build")
        except subprocess.CalledProcessError as err:  # as Paddle's run_cmd reports it: a RuntimeError
            raise RuntimeError(f"Failed to run command, errors: {err}")
    return load


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMOE_OPS_CACHE", str(tmp_path))  # no cached build: build_and_load compiles


@pytest.mark.parametrize("status", [-signal.SIGINT, 128 + signal.SIGINT, -signal.SIGTERM])
def test_interrupted_compiler_raises_keyboard_interrupt(fresh_cache, monkeypatch, status):
    from paddle.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", _fail_with(status))
    with pytest.raises(KeyboardInterrupt):
        _build.build_and_load()


def test_a_real_compile_error_is_still_a_build_error(fresh_cache, monkeypatch):
    from paddle.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", _fail_with(1))
    with pytest.raises(_build.OpsBuildError, match="building the custom ops failed"):
        _build.build_and_load()
