#!/usr/bin/env python
"""Hierarchical expert storage vs all-resident experts: tokens/s and peak RSS on CPU.

    python tools/bench_storage.py --json bench_storage.json                 # the full sweep (~15 min)
    python tools/bench_storage.py --mix t2 u --repeats 1 --steps 6          # a quick look

Workload: ``configs/storage/bench_expert_heavy.yaml`` (4 MoE layers x 64 experts, expert
states 99% of the model's bytes) trained by the real ``Trainer`` on one process with task-routed
synthetic data: 8 tasks own disjoint 24-token vocabularies and 8 of the 64 experts of every
layer; the bench marks each token's task and a member index in its embedding and lets every
router read them at step 0 (``_task_routing``), so a task's tokens keep going to its experts;
the other 64 tokens are generic (no task) and route by the routers' random weights.
Each step draws ``--tasks`` distinct tasks from a skewed distribution (p_t ~ 1/(t+1)^skew,
``--skew`` 2 by default: a few popular tasks and a long tail, the activation skew the host
cache's LFU policy is built for) and fills
the batch with their sequences, so a step touches about k/8 of the expert states for k tasks
(``--mix t1 ... t8``; ``u``: uniform tokens and untouched routers); the fraction alpha reported
is *measured* (activated (layer, expert) pairs per step / all).

Both modes use the lazy expert update (``optim.expert_update: lazy``; identical losses, which
the bench checks). ``resident``: every expert stack and moment in memory. ``tiered``: host RAM
for expert states capped at ``--cap-fraction`` (default 0.5) of the expert states' bytes
(12 B per expert parameter), working set and its gradients included: the working set is sized
for alpha_plan = 0.3 and the host cache gets the rest; every state lives on disk under
``--store-dir`` (O_DIRECT, so reads really hit the disk). Each run is a separate process
(peak RSS = ru_maxrss of that process, initialization included); medians over ``--repeats``.

``--json PATH`` writes ``{"results": {"resident": {...}, "tiered": {...}}, "sweep": [...]}``,
"tiered" being the run at the largest measured alpha <= 0.3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "storage" / "bench_expert_heavy.yaml"
NUM_TASKS = 8
TASK_VOCAB = 24  # tokens [24 t, 24 t + 24) belong to task t; tokens >= 192 to no task ("generic")
# Paddle's CPU allocator hands large buffers (the resident path's full-size expert gradients,
# 538 MB a step here) back to the OS at every free, so each step page-faults them in again
# (~140k faults/step, 0.3-1 s on this VM). glibc keeps them in its heap with these settings;
# both modes run with the same environment (--no-malloc-tuning to compare without).
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--mix", nargs="+", default=["t1", "t2", "t3", "t4", "t6", "t8"],
                   help="workloads: tK = K tasks per step, tKuN = N of the sequences generic tokens, u = uniform "
                        "tokens without task routing (alpha grows with K)")
    p.add_argument("--repeats", type=int, default=3, help="runs per point (median)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps first")
    p.add_argument("--cap-fraction", type=float, default=0.5, help="host RAM for expert states / all expert states")
    p.add_argument("--alpha-plan", type=float, default=0.3, help="alpha the working set is sized for")
    p.add_argument("--skew", type=float, default=2.0, help="task popularity p_t ~ 1/(t+1)^skew")
    p.add_argument("--threads", type=int, default=1, help="Paddle CPU threads (the storage worker uses another core)")
    p.add_argument("--store-dir", default=None, help="SSD tier directory (default: a temp dir under outputs/)")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--no-malloc-tuning", action="store_true", help="run workers without the glibc malloc settings")
    p.add_argument("--worker", choices=["resident", "tiered"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-tasks", default="t2", help=argparse.SUPPRESS)
    p.add_argument("-o", "--override", action="append", default=[], help="override a config key (both modes)")
    return p.parse_args(argv)


def uptime_load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ----------------------------------------------------------------------------- worker
def _task_routing(model, num_tasks: int, emb_scale: float = 1.0, task_weight: float = 4.0, member_weight: float = 2.0) -> None:
    """Route the tokens of task t (ids [24 t, 24 t + 24)) to the 8 experts [8 t, 8 t + 8) of every
    MoE layer, token ``24 t + i`` to members ``i mod 8`` (first choice) and ``i + 1 mod 8``:
    coordinate t of the token embedding marks the task and coordinate 8 + (i mod 8) the member
    (after the LayerNorm both dominate the hidden state); the router column of expert (t, j) reads
    the task coordinate with ``task_weight``, member j's with ``member_weight`` and member j - 1's
    with half of it. Stable under training, so a step with k tasks touches k/8 of the experts
    from its first step on."""
    import numpy as np

    from paddle_semoe.moe.layer import MoELayer

    emb = model.tok_emb.weight
    w = emb.numpy()
    per_group = None
    for layer in model.sublayers():
        if isinstance(layer, MoELayer):
            per_group = layer.router.weight.shape[1] // num_tasks
            break
    for t in range(num_tasks):
        for i in range(TASK_VOCAB):
            v = t * TASK_VOCAB + i
            w[v, t] += emb_scale
            w[v, num_tasks + i % per_group] += emb_scale
    emb.set_value(w)
    for layer in model.sublayers():
        if isinstance(layer, MoELayer):
            r = layer.router.weight
            g = r.numpy()
            for t in range(num_tasks):
                for j in range(per_group):
                    e = t * per_group + j
                    g[t, e] += task_weight
                    g[num_tasks + j, e] += member_weight
                    g[num_tasks + (j - 1) % per_group, e] += member_weight / 2
            r.set_value(g.astype(np.float32))


def parse_mix(spec: str, batch: int) -> tuple[int, int]:
    """``"t2"`` -> 2 tasks; ``"t2u4"`` -> 4 of the sequences of generic tokens (routed over all
    experts), the rest from 2 tasks; ``"u"`` -> uniform tokens and no task routing at all.
    Returns (tasks, generic sequences)."""
    import re

    m = re.fullmatch(r"(?:t(\d+))?(?:u(\d*))?", spec)
    if not spec or m is None:
        raise ValueError(f"workload spec {spec!r}: expected tK, tKuN or u (e.g. t2, t8u4, u)")
    tasks = int(m.group(1) or 0)
    uniform = batch if (m.group(2) == "" and tasks == 0) else int(m.group(2) or 0)
    if not 0 <= tasks <= NUM_TASKS or not 0 <= uniform <= batch or (tasks == 0 and uniform < batch):
        raise ValueError(f"workload spec {spec!r}: 0 < tasks <= {NUM_TASKS} and uniform <= {batch} sequences")
    return tasks, uniform


def _batches(seed: int, spec: str, batch: int, seq: int, vocab: int, skew: float):
    """Token batches [batch, seq + 1] for a workload spec (:func:`parse_mix`)."""
    import numpy as np

    tasks_per_step, uniform = parse_mix(spec, batch)
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, NUM_TASKS + 1) ** skew
    p /= p.sum()
    per = TASK_VOCAB
    while True:
        if not tasks_per_step:
            yield rng.integers(0, vocab, size=(batch, seq + 1))
            continue
        out = rng.integers(NUM_TASKS * per, vocab, size=(batch, seq + 1))  # generic tokens
        tasks = rng.choice(NUM_TASKS, size=tasks_per_step, replace=False, p=p)
        for i in range(batch - uniform):
            t = tasks[i % tasks_per_step]
            out[i] = rng.integers(t * per, (t + 1) * per, size=seq + 1)
        yield out


def run_worker(args: argparse.Namespace) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import resource

    from paddle_semoe import ops
    from paddle_semoe.config import load_config
    from paddle_semoe.engine.config import TrainConfig
    from paddle_semoe.engine.distributed import init_distributed
    from paddle_semoe.engine.trainer import Trainer
    from paddle_semoe.storage.layout import ExpertStateLayout

    tiered = args.worker == "tiered"
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench_storage_{args.worker}_", dir=args.store_dir))
    base = load_config(TrainConfig, args.config, args.override)
    m = base.model
    n_local = m.moe.num_experts * len(m.moe_layers)
    lay = ExpertStateLayout(m.d_model, m.moe.d_ff or m.d_ff)
    states = n_local * lay.state_bytes
    overrides = list(args.override) + [f"train.output_dir={out_dir}"]
    if tiered:
        ws = args.alpha_plan * n_local * lay.weight_bytes  # compute copies; their gradients are as large
        cache = args.cap_fraction * states - 2 * ws
        overrides += [
            "storage.enabled=true",
            f"storage.host_cache_mb={cache / 2**20:.3f}",
            f"storage.working_set_mb={ws / 2**20:.3f}",
            f"storage.dir={out_dir / 'store'}",
        ]
    cfg = load_config(TrainConfig, args.config, overrides)
    ops.resolve_backend(cfg.model.ops_backend)
    ctx = init_distributed(cfg)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, ctx)
    if parse_mix(args.worker_tasks, cfg.data.global_batch_size)[0] > 0:
        _task_routing(trainer.model, NUM_TASKS)
    trainer._ensure_experts()
    init_s = time.perf_counter() - t0
    rss_init = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from paddle_semoe.engine.optim import lr_at

    batches = _batches(1234, args.worker_tasks, cfg.data.global_batch_size, cfg.data.seq_len, cfg.model.vocab_size, args.skew)
    losses, times = [], []
    lazy = trainer.optimizer.lazy
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            lazy.interval_scalars()  # reset the counters: report the timed steps only
        trainer.optimizer.set_lr(lr_at(i, cfg.optim, cfg.train.max_steps))
        b = next(batches)
        t = time.perf_counter()
        r = trainer.train_step(b)
        times.append(time.perf_counter() - t)
        losses.append(r.loss)
    stats = lazy.interval_scalars()
    timed = times[args.warmup :]
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    res = {
        "mode": args.worker,
        "mix": args.worker_tasks,
        "alpha": stats.get("alpha"),
        "tokens_per_s": tokens * len(timed) / sum(timed),
        "step_s_median": statistics.median(timed),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_init_bytes": rss_init,
        "init_s": init_s,
        "expert_state_bytes": states,
        "losses": losses,
        "load": uptime_load(),
    }
    if tiered:
        res.update({k: v for k, v in stats.items() if k != "alpha"})
        res["host_cache_mb"] = cfg.storage.host_cache_mb
        res["working_set_mb"] = cfg.storage.working_set_mb
        trainer.tiered.close()
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- driver
def run_one(args: argparse.Namespace, mode: str, tasks: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--worker-tasks", tasks,
           "--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--cap-fraction", str(args.cap_fraction), "--alpha-plan", str(args.alpha_plan), "--threads", str(args.threads),
           "--skew", str(args.skew)]
    if args.store_dir:
        cmd += ["--store-dir", args.store_dir]
    for o in args.override:
        cmd += ["-o", o]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), GLOG_minloglevel="2")
    if not args.no_malloc_tuning:
        env.update(MALLOC_TUNING)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"bench worker ({mode}, tasks={tasks}) failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s, with medians of the other numbers."""
    runs = sorted(runs, key=lambda r: r["tokens_per_s"])
    med = dict(runs[len(runs) // 2])
    for key in ("tokens_per_s", "peak_rss_bytes", "hit_rate", "prefetch_wait_s_per_step", "ssd_read_bytes_per_step",
                "ssd_write_bytes_per_step", "h2d_bytes_per_step", "alpha"):
        vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        if vals:
            med[key] = statistics.median(vals)
    med["runs"] = len(runs)
    med["tokens_per_s_all"] = [r["tokens_per_s"] for r in runs]
    return med


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)), flush=True)
        return 0
    if args.store_dir is None:
        args.store_dir = str(REPO / "outputs" / "bench_storage")
    Path(args.store_dir).mkdir(parents=True, exist_ok=True)
    print(f"load at start: {uptime_load()}", flush=True)
    for spec in args.mix:
        parse_mix(spec, 8)
    resident_runs: dict[str, list[dict]] = {t: [] for t in args.mix}
    tiered_runs: dict[str, list[dict]] = {t: [] for t in args.mix}
    for rep in range(args.repeats):  # interleaved, so slow phases of the machine hit both modes
        for t in args.mix:
            for mode, bucket in (("resident", resident_runs), ("tiered", tiered_runs)):
                r = run_one(args, mode, t)
                bucket[t].append(r)
                print(f"  rep {rep} {t:<5} {mode:<8} alpha {r['alpha']:.3f} {r['tokens_per_s']:7.0f} tok/s "
                      f"peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB  load {r['load']}", flush=True)
    sweep = []
    for t in args.mix:
        res, tie = _median_run(resident_runs[t]), _median_run(tiered_runs[t])
        same = all(a["losses"] == b["losses"] for a in resident_runs[t] for b in tiered_runs[t])
        sweep.append({
            "mix": t,
            "alpha": tie["alpha"],
            "tokens_per_s": tie["tokens_per_s"],
            "peak_rss_bytes": tie["peak_rss_bytes"],
            "hit_rate": tie["hit_rate"],
            "prefetch_wait_s_per_step": tie["prefetch_wait_s_per_step"],
            "ssd_read_bytes_per_step": tie["ssd_read_bytes_per_step"],
            "ssd_write_bytes_per_step": tie["ssd_write_bytes_per_step"],
            "h2d_bytes_per_step": tie["h2d_bytes_per_step"],
            "resident_tokens_per_s": res["tokens_per_s"],
            "resident_peak_rss_bytes": res["peak_rss_bytes"],
            "speed_ratio": tie["tokens_per_s"] / res["tokens_per_s"],
            "rss_ratio": tie["peak_rss_bytes"] / res["peak_rss_bytes"],
            "losses_identical": same,
            "tiered_runs": tiered_runs[t],
            "resident_runs": resident_runs[t],
        })
    print(f"\nexpert-heavy config, cap {args.cap_fraction:.2f} x expert states, medians of {args.repeats}; load now {uptime_load()}")
    hdr = (f"{'mix':>5} {'alpha':>6} {'res tok/s':>10} {'tier tok/s':>10} {'ratio':>6} {'res RSS MiB':>11} "
           f"{'tier RSS MiB':>12} {'ratio':>6} {'hit':>5} {'read MB/st':>10} {'write MB/st':>11} {'wait s/st':>9} {'same loss':>9}")
    print(hdr)
    for s in sweep:
        print(f"{s['mix']:>5} {s['alpha']:>6.3f} {s['resident_tokens_per_s']:>10.0f} {s['tokens_per_s']:>10.0f} "
              f"{s['speed_ratio']:>6.2f} {s['resident_peak_rss_bytes'] / 2**20:>11.0f} {s['peak_rss_bytes'] / 2**20:>12.0f} "
              f"{s['rss_ratio']:>6.2f} {s['hit_rate']:>5.2f} {s['ssd_read_bytes_per_step'] / 1e6:>10.1f} "
              f"{s['ssd_write_bytes_per_step'] / 1e6:>11.1f} {s['prefetch_wait_s_per_step']:>9.3f} {str(s['losses_identical']):>9}")
    eligible = [s for s in sweep if s["alpha"] <= 0.3]
    pick = max(eligible, key=lambda s: s["alpha"]) if eligible else None
    if args.json:
        out = {
            "results": {
                "resident": {"tokens_per_s": pick["resident_tokens_per_s"], "peak_rss_bytes": pick["resident_peak_rss_bytes"],
                             "alpha": pick["alpha"]} if pick else None,
                "tiered": {"tokens_per_s": pick["tokens_per_s"], "peak_rss_bytes": pick["peak_rss_bytes"],
                           "alpha": pick["alpha"], "hit_rate": pick["hit_rate"], "speed_ratio": pick["speed_ratio"],
                           "rss_ratio": pick["rss_ratio"]} if pick else None,
            },
            "sweep": [{k: v for k, v in s.items() if not k.endswith("_runs")} for s in sweep],
            "runs": {s["mix"]: {"resident": s["resident_runs"], "tiered": s["tiered_runs"]} for s in sweep},
            "setup": {"config": args.config, "cap_fraction": args.cap_fraction, "alpha_plan": args.alpha_plan,
                      "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads,
                      "skew": args.skew, "malloc_tuning": None if args.no_malloc_tuning else MALLOC_TUNING,
                      "load_end": uptime_load()},
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
