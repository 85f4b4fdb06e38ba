"""Multi-process tests: marked ``dist`` (deselect with ``-m 'not dist'``)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "dist: starts several processes with paddle.distributed.launch (Gloo, CPU)")
