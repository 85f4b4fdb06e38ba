"""Run ``tools/train.py`` on 1 or N processes from tests, optionally in the background."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "tools" / "train.py"


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOG_minloglevel="2",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for k in [k for k in env if k.startswith("PADDLE_")]:  # never inherit an outer launch
        env.pop(k)
    return env


def command(nproc: int, config: Path, overrides: list[str], log_dir: Path, extra: list[str] = ()) -> list[str]:
    args = [str(TRAIN), "-c", str(config), "--threads", "1", *extra]
    for o in overrides:
        args += ["-o", o]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
            "--log_dir", str(log_dir), "--max_restart", "0", *args]


@dataclass
class RunResult:
    returncode: int
    output: str

    def json_lines(self) -> list[dict]:
        out = []
        for line in self.output.splitlines():
            line = line.strip()
            if line.startswith("{") and line.endswith("}"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out


def run(nproc: int, config: Path, overrides: list[str], work: Path, extra: list[str] = (), timeout_s: float = 240) -> RunResult:
    log_dir = work / f"launch_{len(list(work.glob('launch_*')))}"
    proc = subprocess.Popen(command(nproc, config, overrides, log_dir, list(extra)), cwd=str(work), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        out += f"\n[train_runner] killed after {timeout_s}s"
    logs = "".join(f"\n--- {p.name} ---\n" + p.read_text(errors="replace")[-4000:] for p in sorted(log_dir.glob("workerlog.*")))
    return RunResult(proc.returncode, out + logs)


def start(nproc: int, config: Path, overrides: list[str], work: Path) -> subprocess.Popen:
    log_dir = work / f"launch_{len(list(work.glob('launch_*')))}"
    return subprocess.Popen(command(nproc, config, overrides, log_dir), cwd=str(work), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first found through /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant. The launcher starts each worker in its own
    session (setsid), so killing the launcher's process group would leave the workers running."""
    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the whole job (launcher and workers), as a crash would."""
    kill_tree(proc.pid)
    proc.wait()


def metrics(path: Path, kind: str = "train", after_step: int = 0) -> dict[int, dict]:
    """step -> the last record of that kind in metrics.jsonl, for steps > ``after_step``.

    A resumed run first drops the records past its checkpoint's step, then appends; so after
    a resume from step s, the records of steps > s are the resumed run's."""
    out: dict[int, dict] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill (read while being written)
            continue
        if rec.get("kind") == kind and rec["step"] > after_step:
            out[rec["step"]] = rec
    return out


def logged_steps(path: Path, kind: str = "train") -> list[int]:
    """The steps of the records of that kind, in file order (a resumed run repeats none)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [rec["step"] for rec in records if rec.get("kind") == kind]


def wait_for(pred, timeout_s: float, what: str) -> None:
    """Poll ``pred()`` every 50 ms until it is true; AssertionError after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill_then_resume(nproc: int, config: Path, common: list[str], tmp_path: Path, until_step: int = 14) -> tuple[dict, dict, int]:
    """An uninterrupted reference run and the same run SIGKILLed right after its first checkpoint,
    then resumed with ``train.resume=auto``; both stopped once they logged ``until_step``.

    Returns (reference metrics, resumed metrics of the steps after the checkpoint, checkpoint step);
    also asserts that the resumed run's metrics repeat no step."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = start(nproc, config, common + [f"train.output_dir={ref_dir}"], tmp_path)
    try:
        wait_for(lambda: until_step in metrics(ref_dir / "metrics.jsonl"), 180, f"reference step {until_step}")
    finally:
        kill(ref)
    job = start(nproc, config, common + [f"train.output_dir={run_dir}"], tmp_path)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "latest").exists(), 180, "first checkpoint")
    finally:
        kill(job)  # SIGKILL of the whole job
    resumed_from = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    job = start(nproc, config, common + [f"train.output_dir={run_dir}", "train.resume=auto"], tmp_path)
    try:
        wait_for(lambda: until_step in metrics(run_dir / "metrics.jsonl", after_step=resumed_from), 180,
                 f"resumed step {until_step}")
    finally:
        kill(job)
    logged = logged_steps(run_dir / "metrics.jsonl")
    assert logged == sorted(set(logged)), f"a step is logged twice after the resume: {logged}"
    return metrics(ref_dir / "metrics.jsonl"), metrics(run_dir / "metrics.jsonl", after_step=resumed_from), resumed_from
