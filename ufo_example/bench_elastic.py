#!/usr/bin/env python
"""Load-aware plan against the naive one-rank-per-task plan, same tasks, same processes.

    python ufo_example/bench_elastic.py --nproc 4 --runs 3 --json outputs/bench_elastic_4.json

Each run launches ``ufo_example/train.py`` with ``paddle.distributed.launch`` once per plan (the
order alternates between runs so drift in the machine's load hits both), reads every rank's
phase times of every step (``timings.npz``), drops the warm-up steps and reports medians over
the runs of:

* step time = per step, the slowest rank's compute + sync + update (wall), and from it
  samples/s per rank and the time of one epoch (one pass of the largest task over the training
  images: ``ceil(n_train / B_max)`` steps);
* per rank and step: busy (compute + update) wall and CPU time, idle (waiting in the gradient
  reduction for slower ranks) and the communication itself.

When processes outnumber cores (4 on this 2-core machine) the ranks time-share the cores: the
heavy rank of the naive plan gets the cores the idle ranks leave, so wall-clock gains shrink.
The table therefore also shows a *dedicated-core projection*: the step time if every rank had
a core of its own = max over ranks of its busy CPU time + the measured communication time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from paddle_semoe.elastic.timing import COLUMNS  # noqa: E402

PLANS = ("naive", "load_aware")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "ufo_example" / "configs" / "ufo_bench_cpu.yaml"))
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps dropped from each run")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    return p.parse_args(argv)


def run_once(args, plan: str, work: Path) -> dict:
    out = work / plan
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(args.nproc),
           "--log_dir", str(out / "log"), str(REPO / "ufo_example" / "train.py"), "-c", args.config,
           "--threads", str(args.threads), "-o", f"elastic.plan={plan}", "-o", f"train.output_dir={out}",
           "-o", f"train.max_steps={args.steps}", "-o", "train.resume=none"]
    for o in args.override:
        cmd += ["-o", o]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), GLOG_minloglevel="2")
    if args.nproc == 1:
        cmd = cmd[:1] + cmd[cmd.index(str(REPO / "ufo_example" / "train.py")):]
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True)
    if proc.returncode != 0:
        logs = "".join(p.read_text()[-3000:] for p in sorted((out / "log").glob("workerlog.*")))
        raise SystemExit(f"{plan} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}")
    with np.load(out / "timings.npz") as z:
        rows = z["rows"]
        assert list(z["columns"]) == list(COLUMNS)
    plan_info = json.loads((out / "plan.json").read_text())
    return {"rows": rows, "plan": plan_info["plan"], "predicted_busy_s": plan_info["predicted_busy_s"]}


def measure(rows: np.ndarray, warmup: int) -> dict:
    """Per-run numbers from rows[rank, step, column] (warm-up steps dropped)."""
    c = {name: i for i, name in enumerate(COLUMNS)}
    r = rows[:, warmup:, :]
    busy = r[..., c["compute_wall"]] + r[..., c["update_wall"]]
    busy_cpu = r[..., c["compute_cpu"]] + r[..., c["update_cpu"]]
    sync = r[..., c["sync_wall"]]
    idle = sync - sync.min(axis=0, keepdims=True)
    comm = sync - idle
    step = (busy + sync).max(axis=0)  # [steps]
    projected = (busy_cpu + comm).max(axis=0)
    return {
        "step_s": float(np.median(step)),
        "projected_step_s": float(np.median(projected)),
        "busy_s": np.median(busy, axis=1).tolist(),
        "busy_cpu_s": np.median(busy_cpu, axis=1).tolist(),
        "idle_s": np.median(idle, axis=1).tolist(),
        "comm_s": np.median(comm, axis=1).tolist(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from paddle_semoe.config import load_config
    from ufo_example.config import UFOJobConfig

    cfg = load_config(UFOJobConfig, args.config, args.override)
    batch = [t.batch_size for t in cfg.tasks]
    samples = sum(batch)
    n_total = 600 if cfg.data.source == "synthetic" else 1797
    n_train = n_total - int(round(cfg.data.val_fraction * n_total))
    steps_per_epoch = math.ceil(n_train / max(batch))
    uptime_before = os.getloadavg()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_elastic_"))
    work.mkdir(parents=True, exist_ok=True)
    per_plan: dict[str, list[dict]] = {p: [] for p in PLANS}
    plans: dict[str, dict] = {}
    t0 = time.time()
    for i in range(args.runs):
        order = PLANS if i % 2 == 0 else PLANS[::-1]
        for plan in order:
            res = run_once(args, plan, work / f"run{i}")
            per_plan[plan].append(measure(res["rows"], args.warmup))
            plans[plan] = {"plan": res["plan"], "predicted_busy_s": res["predicted_busy_s"]}
            print(f"run {i} {plan:<10} step {per_plan[plan][-1]['step_s'] * 1e3:7.1f} ms", flush=True)
    W = args.nproc
    summary: dict[str, dict] = {}
    for plan, runs in per_plan.items():
        med = lambda key: float(np.median([r[key] for r in runs]))  # noqa: E731
        medv = lambda key: np.median(np.array([r[key] for r in runs]), axis=0).tolist()  # noqa: E731
        step = med("step_s")
        summary[plan] = {
            "step_s": step,
            "samples_per_s_per_rank": samples / step / W,
            "epoch_s": steps_per_epoch * step,
            "projected_step_s": med("projected_step_s"),
            "projected_samples_per_s_per_rank": samples / med("projected_step_s") / W,
            "busy_s": medv("busy_s"),
            "busy_cpu_s": medv("busy_cpu_s"),
            "idle_s": medv("idle_s"),
            "comm_s": medv("comm_s"),
            "runs_step_s": [r["step_s"] for r in runs],
            **plans[plan],
        }
    gain = summary["naive"]["step_s"] / summary["load_aware"]["step_s"]
    gain_proj = summary["naive"]["projected_step_s"] / summary["load_aware"]["projected_step_s"]
    ms = lambda v: "/".join(f"{x * 1e3:.0f}" for x in v)  # noqa: E731
    print()
    print(f"{W} processes x {args.threads} thread(s) on {os.cpu_count()} cores; batches {batch} ({samples} samples/step); "
          f"{args.runs} runs x {args.steps} steps ({args.warmup} warm-up dropped), medians; epoch = {steps_per_epoch} steps")
    print(f"load average before: {uptime_before[0]:.2f} {uptime_before[1]:.2f} {uptime_before[2]:.2f}; after: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    hdr = "| plan | step ms | samples/s per rank | epoch s | busy ms per rank (wall) | busy CPU ms per rank | idle ms per rank | comm ms per rank | projected samples/s per rank (own core) |"
    print(hdr)
    print("|" + "---|" * 9)
    for plan in PLANS:
        s = summary[plan]
        print(f"| {plan} | {s['step_s'] * 1e3:.1f} | {s['samples_per_s_per_rank']:.1f} | {s['epoch_s']:.2f} | {ms(s['busy_s'])} | "
              f"{ms(s['busy_cpu_s'])} | {ms(s['idle_s'])} | {ms(s['comm_s'])} | {s['projected_samples_per_s_per_rank']:.1f} |")
    print(f"| load-aware vs naive | x{gain:.2f} ({gain - 1:+.1%}) | | | | | | | x{gain_proj:.2f} ({gain_proj - 1:+.1%}) |")
    result = {
        "config": args.config, "overrides": args.override, "nproc": W, "threads": args.threads, "cores": os.cpu_count(),
        "runs": args.runs, "steps": args.steps, "warmup": args.warmup, "batch": batch, "steps_per_epoch": steps_per_epoch,
        "loadavg_before": uptime_before, "loadavg_after": os.getloadavg(), "elapsed_s": time.time() - t0,
        "plans": summary, "gain_samples_per_s_per_rank": gain, "gain_projected": gain_proj,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
