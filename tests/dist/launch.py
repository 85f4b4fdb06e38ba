"""Start N worker processes with ``paddle.distributed.launch`` and collect what they wrote.

Why the launcher (and not ``paddle.distributed.spawn``): it is the path users run, it selects
Gloo on a CPU build by itself, sets ``PADDLE_LOCAL_SIZE`` etc., and it runs the worker as a
plain script in fresh interpreters (spawn would pickle test functions and re-import pytest's
modules in every child). It tears the job down as soon as one worker exits non-zero, which is
what the failure tests rely on. Each call gets its own ``--log_dir`` (per-rank
``workerlog.N``) and the whole launcher runs in its own session, killed on timeout.

Workers write ``<out>/rank<R>.npz``; :func:`launch` returns them as dicts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


@dataclass
class LaunchResult:
    returncode: int
    elapsed_s: float
    output: str  # launcher stdout+stderr
    logs: dict[int, str] = field(default_factory=dict)  # rank -> workerlog text
    results: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # rank -> arrays

    def describe(self) -> str:
        """Everything useful for an assertion message."""
        parts = [f"returncode={self.returncode} elapsed={self.elapsed_s:.1f}s", self.output[-3000:]]
        for r, text in sorted(self.logs.items()):
            parts.append(f"--- workerlog.{r} ---\n{text[-3000:]}")
        return "\n".join(parts)


def launch(script: Path, nproc: int, out_dir: Path, args: list[str] | None = None, timeout_s: float = 150.0) -> LaunchResult:
    """Run ``script --out out_dir ARGS`` on ``nproc`` processes; wait at most ``timeout_s``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = out_dir / "log"
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        GLOG_minloglevel="2",
        PYTHONUNBUFFERED="1",
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [
        sys.executable,
        "-m",
        "paddle.distributed.launch",
        "--nproc_per_node",
        str(nproc),
        "--log_dir",
        str(log_dir),
        "--max_restart",
        "0",
        str(script),
        "--out",
        str(out_dir),
        *(args or []),
    ]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=str(out_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        from tests.dist.train_runner import kill_tree

        kill_tree(proc.pid)  # the launcher and its workers (each worker runs in its own session)
        output, _ = proc.communicate()
        output += f"\n[launch helper] killed after {timeout_s}s"
    elapsed = time.monotonic() - start
    logs = {}
    for r in range(nproc):
        f = log_dir / f"workerlog.{r}"
        logs[r] = f.read_text(errors="replace") if f.exists() else ""
    results = {}
    for r in range(nproc):
        f = out_dir / f"rank{r}.npz"
        if f.exists():
            with np.load(f) as data:
                results[r] = {k: data[k] for k in data.files}
    return LaunchResult(proc.returncode, elapsed, output, logs, results)
