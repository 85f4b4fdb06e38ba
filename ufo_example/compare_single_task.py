#!/usr/bin/env python
"""Held-out accuracy of the multi-task UFO model against single-task models of the same compute.

    python ufo_example/compare_single_task.py --steps 400 --seeds 42 --json ufo_example/results/accuracy.json

For every seed:

* **multi-task**: the config's four tasks, batches 64/32/16/16 (128 images per step), ``steps``
  steps, one process (the plan does not change the result: see tests/elastic);
* **single-task, same compute**: for each task alone, the same architecture with that task's
  expert only, 128 images of that task per step for the same number of steps: the same FLOPs
  as the whole multi-task run, spent on one task;
* **single-task, same samples**: that task alone with its multi-task batch size (64/32/16/16):
  the same task data the multi-task model saw, and a quarter to an eighth of its compute.

Prints a table (accuracy per task; mean over seeds, and each seed) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "ufo_example" / "configs" / "ufo_tiny_cpu.yaml"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip_same_samples", action="store_true")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--work", type=Path, default=None, help="keep run directories here")
    return p.parse_args(argv)


def train(args, out: Path, seed: int, extra: list[str]) -> dict:
    cmd = [sys.executable, str(REPO / "ufo_example" / "train.py"), "-c", args.config, "--threads", str(args.threads),
           "-o", f"train.output_dir={out}", "-o", f"train.max_steps={args.steps}", "-o", f"train.seed={seed}",
           "-o", "train.resume=none", "-o", f"train.eval_every={args.steps}", "-o", "train.save_every=0",
           "-o", "elastic.cost_source=flops", "-o", "monitor.visualdl=false"]
    for o in [*args.override, *extra]:
        cmd += ["-o", o]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), GLOG_minloglevel="2")
    for k in [k for k in env if k.startswith("PADDLE_")]:
        env.pop(k)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run {out} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_s"] = time.time() - t0
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    from paddle_semoe.config import load_config
    from ufo_example.config import UFOJobConfig

    cfg = load_config(UFOJobConfig, args.config, args.override)
    tasks = cfg.tasks
    total = sum(t.batch_size for t in tasks)
    work = args.work or Path(tempfile.mkdtemp(prefix="ufo_compare_"))
    load_before = os.getloadavg()
    results: dict[str, dict[str, list[float]]] = {"multi-task": {}, "single, same compute": {}, "single, same samples": {}}
    walls: dict[str, float] = {}
    for seed in args.seeds:
        s = train(args, work / f"multi_s{seed}", seed, [])
        walls[f"multi_s{seed}"] = s["wall_s"]
        for t in tasks:
            results["multi-task"].setdefault(t.name, []).append(s["eval"][f"acc/{t.name}"])
        print(f"seed {seed} multi-task: " + " ".join(f"{t.name} {s['eval'][f'acc/{t.name}']:.3f}" for t in tasks), flush=True)
        variants = [("single, same compute", total)]
        if not args.skip_same_samples:
            variants.append(("single, same samples", None))
        for label, batch in variants:
            for t in tasks:
                b = batch or t.batch_size
                spec = f"[{{name: {t.name}, kind: {t.kind}, batch_size: {b}}}]"
                s = train(args, work / f"{t.name}_b{b}_s{seed}", seed, [f"tasks={spec}"])
                walls[f"{t.name}_b{b}_s{seed}"] = s["wall_s"]
                results[label].setdefault(t.name, []).append(s["eval"][f"acc/{t.name}"])
                print(f"seed {seed} {label} {t.name} (batch {b}): {s['eval'][f'acc/{t.name}']:.3f}", flush=True)
    print()
    print(f"held-out accuracy after {args.steps} steps, mean over seeds {args.seeds} (each seed in brackets); "
          f"batches {[t.batch_size for t in tasks]}; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print("| model | images/step | " + " | ".join(t.name for t in tasks) + " |")
    print("|---|---|" + "---|" * len(tasks))
    for label, accs in results.items():
        if not accs:
            continue
        per_step = {"multi-task": f"{total} (all tasks)", "single, same compute": f"{total} (one task)",
                    "single, same samples": "/".join(str(t.batch_size) for t in tasks)}[label]
        cells = [f"{np.mean(accs[t.name]):.3f} [{', '.join(f'{a:.3f}' for a in accs[t.name])}]" for t in tasks]
        print(f"| {label} | {per_step} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "config": args.config, "steps": args.steps, "seeds": args.seeds, "threads": args.threads,
            "batches": {t.name: t.batch_size for t in tasks}, "accuracy": results, "wall_s": walls,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
