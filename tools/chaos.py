#!/usr/bin/env python
"""Chaos run: a 2-process expert-parallel (EP=2) training interrupted at random moments and
resumed with ``train.resume=auto`` each time must end with the same parameters, bit for bit,
as an uninterrupted run, with no partial ``.tmp`` checkpoint left and no metrics step repeated.

    python tools/chaos.py --count 12 --seed 7            # the long variant (>= 10 interruptions)
    python tools/chaos.py --count 3 --max-steps 12 --seed 3   # what tests/faults/test_chaos.py runs

Faults, drawn at random: ``kill_rank`` (SIGKILL of one random worker: a crash; the other rank
fails on its next collective), ``term_launcher`` (SIGTERM to ``paddle.distributed.launch``, as a
scheduler's preemption: the workers finish their step, save and exit 75), ``full_disk`` (the
checkpoint writer's fault point ``SEMOE_CKPT_FAULT=enospc:N@R``: a random rank's disk fills up
during the launch's first or second save; the job must end with status 1, one ``error:`` line
naming the full disk on every rank, no ``.tmp`` left and ``latest`` on an earlier checkpoint).
The signals land a random delay after a random step was logged (mid-step or mid-save). Prints
the seed, the count of each fault and the result; exit status 0 when the final parameters match
and every full disk ended as it must, 1 when not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "tests" / "assets" / "gpt_moe_test.yaml"
FAULTS = ("kill_rank", "term_launcher", "full_disk")
CKPT_FAULT_ENV = "SEMOE_CKPT_FAULT"  # paddle_semoe.engine.checkpoint's fault point


@dataclass
class ChaosReport:
    seed: int
    interruptions: int
    faults: dict[str, int] = field(default_factory=lambda: {f: 0 for f in FAULTS})
    launches: int = 0
    max_job_seconds: float = 0.0
    identical: bool = False
    leftover_tmp: list[str] = field(default_factory=list)
    repeated_steps: bool = False
    mismatched: list[str] = field(default_factory=list)
    full_disk_problems: list[str] = field(default_factory=list)  # a full disk that did not end as it must

    @property
    def ok(self) -> bool:
        return self.identical and not self.leftover_tmp and not self.repeated_steps and not self.full_disk_problems


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, **(extra or {}), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLOG_minloglevel="2",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for k in [k for k in env if k.startswith("PADDLE_")]:
        env.pop(k)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if not extra or CKPT_FAULT_ENV not in extra:
        env.pop(CKPT_FAULT_ENV, None)  # never inherit an injected fault
    return env


def _command(overrides: list[str], log_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
           "--max_restart", "0", str(REPO / "tools" / "train.py"), "-c", str(CONFIG), "--threads", "1"]
    for o in overrides:
        cmd += ["-o", o]
    return cmd


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    children.setdefault(int(fh.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out += [c]
            todo.append(c)
    return out


def _workers(pid: int) -> list[int]:
    found = []
    for p in _descendants(pid):
        try:
            if b"train.py" in Path(f"/proc/{p}/cmdline").read_bytes():
                found.append(p)
        except OSError:
            continue
    return found


def _kill_tree(pid: int) -> None:
    for p in [*_descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _logged_steps(path: Path, since: float = 0.0) -> list[int]:
    """Train steps in metrics.jsonl, in file order; ``since``: only records logged after that time."""
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if rec.get("kind") == "train" and float(rec.get("time", 0.0)) >= since:
            steps.append(int(rec["step"]))
    return steps


def _final_arrays(run_dir: Path, step: int) -> dict:
    import numpy as np

    out = {}
    for shard in sorted((run_dir / "checkpoints" / f"step_{step:08d}").glob("rank_*.npz")):
        with np.load(shard, allow_pickle=False) as z:
            out.update({f"{shard.name}/{k}": z[k] for k in z.files if k != "__meta__"})
    return out


def _latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("_")[1]) if latest.exists() else 0


def _saves_after(start: int, max_steps: int, save_every: int) -> int:
    """Checkpoints a launch resumed at ``start`` writes when nothing stops it (the last step's included)."""
    steps = set(range(start + save_every - start % save_every, max_steps + 1, save_every)) | {max_steps}
    return len({s for s in steps if s > start})


def _check_full_disk(rc: int, log_dir: Path, run_dir: Path, latest_before: int) -> list[str]:
    """What went wrong with an injected full disk (empty: status 1, one disk-full line per rank,
    no partial checkpoint, ``latest`` not older than before)."""
    problems = [] if rc == 1 else [f"status {rc} (expected 1)"]
    for wlog in sorted(log_dir.glob("workerlog.*")):
        errors = [ln for ln in wlog.read_text(errors="replace").splitlines() if ln.startswith("error:")]
        if len(errors) != 1 or "disk full" not in errors[0] or "\n" in errors[0]:
            problems.append(f"{wlog.name}: expected one 'error: ... disk full' line, got {errors[:3]}")
    tmp = sorted(p.name for p in (run_dir / "checkpoints").glob("*.tmp"))
    if tmp:
        problems.append(f"partial checkpoints left: {tmp}")
    if _latest_step(run_dir) < latest_before:
        problems.append(f"latest went back from step {latest_before} to {_latest_step(run_dir)}")
    return problems


def run_chaos(work: Path, count: int, seed: int, max_steps: int = 12, save_every: int = 3,
              job_timeout_s: float = 240.0, log=print, order: tuple[str, ...] | None = None) -> ChaosReport:
    """Reference run, then ``count`` interrupted launches, then one to completion; compares.

    ``order``: the faults to use, in turn (default: drawn at random from :data:`FAULTS`); the
    moments, ranks and delays are drawn from ``seed`` either way.
    """
    if order is not None and (not order or any(f not in FAULTS for f in order)):
        raise ValueError(f"order must name faults among {FAULTS}, got {order!r}")
    import numpy as np

    rng = random.Random(seed)
    report = ChaosReport(seed, count)
    common = [f"train.max_steps={max_steps}", f"train.save_every={save_every}", "train.eval_every=1000",
              "parallel.comm_timeout_s=60"]
    ref_dir, run_dir = work / "reference", work / "chaos"
    launch_no = 0

    def launch(out_dir: Path, resume: bool, extra_env: dict | None = None) -> subprocess.Popen:
        nonlocal launch_no
        launch_no += 1
        overrides = common + [f"train.output_dir={out_dir}"] + (["train.resume=auto"] if resume else [])
        return subprocess.Popen(_command(overrides, work / f"launch_{launch_no:03d}"), cwd=work, env=_env(extra_env),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def finish(proc: subprocess.Popen) -> int:
        t0 = time.monotonic()
        try:
            rc = proc.wait(timeout=job_timeout_s)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            raise RuntimeError(f"a job hung for more than {job_timeout_s:.0f} s (launch {launch_no})") from None
        finally:
            _kill_tree(proc.pid)  # workers the launcher left behind
        report.max_job_seconds = max(report.max_job_seconds, time.monotonic() - t0)
        return rc

    rc = finish(launch(ref_dir, resume=False))
    if rc != 0:
        raise RuntimeError(f"the reference run failed with status {rc} (logs in {work}/launch_001)")
    for i in range(count):
        start = _latest_step(run_dir)
        if start >= max_steps:
            log(f"[{i + 1}/{count}] already complete at step {start}: no more interruptions possible")
            break
        target = min(start + rng.randint(1, 3), max_steps - 1)  # a few steps on: many interruptions fit in a run
        fault = rng.choice(FAULTS) if order is None else order[i % len(order)]
        delay = rng.uniform(0.0, 0.4)
        if fault == "full_disk":  # no signal: the job runs into the full disk at its n-th save
            nth, rank = rng.randint(1, min(2, _saves_after(start, max_steps, save_every))), rng.randrange(2)
            proc = launch(run_dir, resume=True, extra_env={CKPT_FAULT_ENV: f"enospc:{nth}@{rank}"})
            report.launches += 1
            rc = finish(proc)
            problems = _check_full_disk(rc, work / f"launch_{launch_no:03d}", run_dir, start)
            report.faults[fault] += 1
            report.full_disk_problems += [f"launch {launch_no}: {p}" for p in problems]
            log(f"[{i + 1}/{count}] from step {start}: full_disk at save {nth} of rank {rank} -> status {rc}, "
                f"latest checkpoint step {_latest_step(run_dir)}" + (f"; PROBLEMS: {problems}" if problems else ""))
            continue
        launched_at = time.time()
        proc = launch(run_dir, resume=True)
        report.launches += 1
        deadline = time.monotonic() + job_timeout_s
        while proc.poll() is None and time.monotonic() < deadline:  # this launch's records only
            if any(s >= target for s in _logged_steps(run_dir / "metrics.jsonl", since=launched_at)[-3:]):
                break
            time.sleep(0.02)
        time.sleep(delay)
        if proc.poll() is None:
            if fault == "kill_rank":
                workers = _workers(proc.pid)
                if workers:
                    os.kill(rng.choice(workers), signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGTERM)
            report.faults[fault] += 1
        rc = finish(proc)
        log(f"[{i + 1}/{count}] from step {start}: {fault} after step {target} (+{delay:.2f}s) -> status {rc}, "
            f"latest checkpoint step {_latest_step(run_dir)}")
    proc = launch(run_dir, resume=True)
    report.launches += 1
    rc = finish(proc)
    if rc != 0:
        raise RuntimeError(f"the final resumed run failed with status {rc} (logs in {work}/launch_{launch_no:03d})")
    a, b = _final_arrays(ref_dir, max_steps), _final_arrays(run_dir, max_steps)
    report.mismatched = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not np.array_equal(a[k], b[k]))
    report.identical = bool(a) and not report.mismatched
    report.leftover_tmp = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith((".tmp", ".old")))
    steps = _logged_steps(run_dir / "metrics.jsonl")
    report.repeated_steps = steps != list(range(1, max_steps + 1))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=10, help="random interruptions (default 10)")
    p.add_argument("--seed", type=int, default=None, help="default: drawn from the clock (printed)")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a new temp directory)")
    args = p.parse_args(argv)
    if args.count < 1 or args.max_steps < 2 or args.save_every < 1:
        p.error("--count >= 1, --max-steps >= 2 and --save-every >= 1 required")
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    work = args.work or Path(tempfile.mkdtemp(prefix="semoe_chaos_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"chaos: seed {seed}, {args.count} interruptions, {args.max_steps} steps, work dir {work}", flush=True)
    r = run_chaos(work, args.count, seed, args.max_steps, args.save_every, log=lambda m: print(m, flush=True))
    print(f"faults: " + ", ".join(f"{k} {v}" for k, v in r.faults.items()) + f"; launches {r.launches}; "
          f"longest job {r.max_job_seconds:.1f} s")
    print(f"final parameters bit-identical to the uninterrupted run: {r.identical}"
          + (f" (differ: {', '.join(r.mismatched[:5])})" if r.mismatched else ""))
    print(f"leftover partial checkpoints: {r.leftover_tmp or 'none'}; metrics steps repeated: {r.repeated_steps}")
    print(f"full disks ended in one line per rank, status 1, no .tmp: "
          f"{'yes' if not r.full_disk_problems else 'NO: ' + '; '.join(r.full_disk_problems)}")
    return 0 if r.ok else 1


if __name__ == "__main__":
    from paddle_semoe.engine.launch_env import run_entry

    sys.exit(run_entry(main, name="chaos"))
