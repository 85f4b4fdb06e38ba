"""Set-up installs only what each command uses: the quickstart never installs scikit-learn
(only the UFO example and the tests use it); the test command still installs what tests need.

The scripts run against a fake Python that reports every package missing and records the
``pip install`` calls, from a copy of tools/ (nothing in the checkout is touched)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE_PY = """#!/usr/bin/env bash
# "-c <code>": every import check fails (nothing installed); "-m pip install ...": recorded.
if [ "$1" = "-c" ]; then exit 1; fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$*" >> "$PIP_LOG"; fi
exit 0
"""


def _installs(tmp_path: Path, script: str) -> str:
    work = tmp_path / "work"
    shutil.copytree(ROOT / "tools", work / "tools", ignore=shutil.ignore_patterns("__pycache__", "gpu_check"))
    (work / "tools" / "check_cuda.sh").write_text("true\n")  # test.sh's compile check: not under test here
    fake = tmp_path / "python"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    log = tmp_path / "pip.log"
    env = dict(os.environ, PYTHON=str(fake), PIP_LOG=str(log))
    r = subprocess.run(["bash", str(work / "tools" / script)], capture_output=True, text=True, env=env, cwd=work)
    assert r.returncode == 0, r.stderr
    return log.read_text()


def test_quickstart_does_not_install_test_or_example_packages(tmp_path):
    pip = _installs(tmp_path, "quickstart.sh")
    assert "paddlepaddle==3.3.1" in pip and "visualdl" in pip and "pyyaml" in pip
    for unused in ("scikit-learn", "pytest", "mypy", "openai", "nvidia-nccl", "paddlepaddle-gpu"):
        assert unused not in pip, f"quickstart installs {unused}"


def test_test_command_installs_what_the_tests_need(tmp_path):
    pip = _installs(tmp_path, "test.sh")
    for needed in ("paddlepaddle==3.3.1", "pytest", "scikit-learn", "mypy==", "tokenizers", "openai"):
        assert needed in pip, f"test.sh does not install {needed}"
    assert "paddlepaddle-gpu" not in pip
