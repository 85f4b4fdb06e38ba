#!/usr/bin/env python
"""End-to-end training throughput (tokens/s) of tools/train.py on this machine.

    python tools/bench_train.py --configs configs/gpt_moe_tiny.yaml,configs/gpt_moe_mid_cpu.yaml \
        --steps 40 --json outputs/bench_train.json

For each config, three variants run as real jobs (tools/train.py, fresh processes):
  dense   the same model with every FFN dense (moe_every=0), 1 process x all threads
  moe_ep1 the MoE model, 1 process x all threads (all experts local)
  moe_ep2 the MoE model, 2 processes x 1 thread (experts split, Gloo all-to-all)
Throughput is the median of the logged per-interval tokens/s after the first interval
(which includes op builds and warm-up).

Side by side with PyTorch (torch is not a dependency; give an interpreter that has it):

    python tools/bench_train.py --compare-torch outputs/torch-venv/bin/python --rounds 3 \
        --variants dense,moe_ep1 --json outputs/bench_train_vs_torch.json

runs, per config and variant, ``rounds`` interleaved pairs (this project, then the exact
PyTorch replica of tools/bench_train_torch.py on the same token batches and thread count) and
reports the median tokens/s of each and the median of the per-round ratios, so that load
from other processes on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "dense": dict(nproc=1, threads=None, overrides=["model.moe_every=0", "parallel.ep_degree=1"]),
    "moe_ep1": dict(nproc=1, threads=None, overrides=["parallel.ep_degree=1"]),
    "moe_ep2": dict(nproc=2, threads=1, overrides=["parallel.ep_degree=2"]),
}


def run_variant(config: Path, name: str, steps: int, log_every: int, work: Path) -> dict:
    v = VARIANTS[name]
    threads = v["threads"] or os.cpu_count() or 1
    out = work / f"{config.stem}_{name}"
    overrides = v["overrides"] + [
        f"train.output_dir={out}", f"train.max_steps={steps}", f"train.log_every={log_every}",
        "train.eval_every=100000", "train.save_every=0", "monitor.visualdl=false",
    ]
    args = [str(REPO / "tools" / "train.py"), "-c", str(config), "--threads", str(threads)]
    for o in overrides:
        args += ["-o", o]
    if v["nproc"] > 1:
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(v["nproc"]), "--log_dir", str(out / "launch"), *args]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{config.name} {name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    tps = [r["tokens_per_s"] for r in train[1:]]  # drop the first interval (builds, warm-up)
    return {
        "tokens_per_s": statistics.median(tps),
        "intervals": tps,
        "final_loss": train[-1]["lm_loss"],
        "peak_rss_bytes": train[-1]["peak_rss_bytes"],
        "processes": v["nproc"],
        "threads_per_process": threads,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="configs/gpt_moe_tiny.yaml,configs/gpt_moe_mid_cpu.yaml")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--compare-torch", default=None, metavar="PYTHON",
                   help="interpreter with torch: time tools/bench_train_torch.py side by side (variants dense, moe_ep1)")
    p.add_argument("--rounds", type=int, default=3, help="with --compare-torch: interleaved pairs per variant")
    args = p.parse_args(argv)
    if args.compare_torch:
        return compare_torch(args)
    report: dict = {"steps": args.steps, "cpu_count": os.cpu_count(), "results": {}}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for cfg in [Path(c) for c in args.configs.split(",") if c]:
            cfg = cfg if cfg.is_absolute() else REPO / cfg
            report["results"][cfg.stem] = {}
            for name in [v for v in args.variants.split(",") if v]:
                r = run_variant(cfg, name, args.steps, args.log_every, Path(tmp))
                report["results"][cfg.stem][name] = r
                print(f"{cfg.stem:<18} {name:<8} {r['tokens_per_s']:9.0f} tok/s  loss {r['final_loss']:.3f}", flush=True)
    print()
    print(f"{'config':<18} {'variant':<8} {'procs x thr':>11} {'tokens/s':>9} {'peak RSS':>9}")
    for cfg, res in report["results"].items():
        for name, r in res.items():
            print(f"{cfg:<18} {name:<8} {r['processes']:>5} x {r['threads_per_process']:<3} {r['tokens_per_s']:9.0f} "
                  f"{r['peak_rss_bytes'] / 2**20:7.0f}Mi")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


TORCH_VARIANTS = ("dense", "moe_ep1")  # 1 process x all threads: what the replica runs


def torch_inputs(config: Path, name: str, steps: int, work: Path) -> tuple[Path, Path]:
    """The replica's model/optim spec and ``steps`` token batches from the project's own
    config loader and batcher (the batches tools/train.py trains on)."""
    sys.path.insert(0, str(REPO))
    from paddle_semoe.config import to_dict
    from paddle_semoe.data import TokenBatcher, load_split
    from paddle_semoe.engine.config import TrainConfig
    from paddle_semoe.engine.launch_env import load_job_config

    cfg, err = load_job_config(TrainConfig, config, VARIANTS[name]["overrides"])
    if cfg is None:
        raise SystemExit(err)
    spec = work / f"{config.stem}_{name}_spec.json"
    spec.write_text(json.dumps({"model": to_dict(cfg.model), "optim": to_dict(cfg.optim)}))
    split = load_split(cfg.data.corpus, cfg.data.val_fraction)
    batcher = TokenBatcher(split.train, cfg.data.global_batch_size, cfg.data.seq_len, seed=cfg.train.seed)
    batches = work / f"{config.stem}_{name}_batches.npy"
    np.save(batches, np.stack([next(batcher) for _ in range(steps)]).astype(np.int64))
    return spec, batches


def run_torch(python: str, spec: Path, batches: Path, steps: int, log_every: int, threads: int, work: Path) -> dict:
    out = work / f"torch_{spec.stem}.json"
    cmd = [python, str(REPO / "tools" / "bench_train_torch.py"), "--spec", str(spec), "--batches", str(batches),
           "--steps", str(steps), "--log-every", str(log_every), "--threads", str(threads), "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"torch replica failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(out.read_text())


def compare_torch(args) -> dict:
    threads = os.cpu_count() or 1
    report: dict = {"steps": args.steps, "rounds": args.rounds, "cpu_count": threads, "results": {}}
    names = [v for v in args.variants.split(",") if v in TORCH_VARIANTS]
    with tempfile.TemporaryDirectory(prefix="bench_train_torch_") as tmp:
        work = Path(tmp)
        for cfg in [Path(c) for c in args.configs.split(",") if c]:
            cfg = cfg if cfg.is_absolute() else REPO / cfg
            report["results"][cfg.stem] = {}
            for name in names:
                spec, batches = torch_inputs(cfg, name, args.steps, work)
                ours, theirs = [], []
                for r in range(args.rounds):
                    ours.append(run_variant(cfg, name, args.steps, args.log_every, work / f"r{r}"))
                    theirs.append(run_torch(args.compare_torch, spec, batches, args.steps, args.log_every, threads, work))
                    print(f"{cfg.stem:<18} {name:<8} round {r}: {ours[-1]['tokens_per_s']:8.0f} tok/s vs torch "
                          f"{theirs[-1]['tokens_per_s']:8.0f}", flush=True)
                a = [o["tokens_per_s"] for o in ours]
                b = [t["tokens_per_s"] for t in theirs]
                report["results"][cfg.stem][name] = {
                    "tokens_per_s": statistics.median(a), "torch_tokens_per_s": statistics.median(b),
                    "ratio": statistics.median([x / y for x, y in zip(a, b)]),
                    "rounds": [{"ours": x, "torch": y} for x, y in zip(a, b)],
                    "torch_params": theirs[-1]["params"], "torch_phase_ms": theirs[-1]["phase_ms"],
                    "final_loss": ours[-1]["final_loss"], "torch_final_loss": theirs[-1]["final_loss"],
                }
    print()
    print(f"{'config':<18} {'variant':<8} {'tokens/s':>9} {'torch':>9} {'ratio':>6}")
    for cfg, res in report["results"].items():
        for name, r in res.items():
            print(f"{cfg:<18} {name:<8} {r['tokens_per_s']:9.0f} {r['torch_tokens_per_s']:9.0f} {r['ratio']:6.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
