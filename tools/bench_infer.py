#!/usr/bin/env python
"""Ring-memory inference vs all-resident vs naive load-on-demand, experts streamed from disk.

    python tools/bench_infer.py --json outputs/bench_infer.json

Builds a GPT-MoE with 8 MoE layers (random weights: throughput does not depend on them),
exports it, and times forward passes at several batch sizes (tokens per forward, from
decode-like to prefill-like) in three serving modes:

  resident  all 8 layers' experts in memory (loaded once)
  ring      K slots (default K=2: "2 of 8 expert layers resident"), a loader thread streams
            layer i+K from disk while layer i..i+K-1 compute
  naive     one slot, each layer loaded synchronously before it runs

Disk reads use O_DIRECT (the page cache never serves them: cold); ``--warm`` adds a ring
run with buffered reads for comparison. Each row also shows the measured per-layer load
time (naive mode), per-layer compute time (resident pass / layers) and the ring's bound
layers x max(load, compute), so the table shows where the ring stops hiding the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--moe-layers", type=int, default=8)
    p.add_argument("--slots", type=int, default=2, help="ring slots K (the expert memory budget in layers)")
    p.add_argument("--tokens", default="8,64,256,512,768,1024,2048,4096", help="tokens per forward to sweep")
    p.add_argument("--seq", type=int, default=128, help="sequence length of the prefill-like batches")
    p.add_argument("--passes", type=int, default=4, help="timed forward passes per point (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warm", action="store_true", help="also time the ring with buffered (page-cached) reads")
    p.add_argument("--headline-tokens", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=None, help="where to write the package (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from paddle_semoe.engine.launch_env import keep_freed_memory

    keep_freed_memory()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import logging

    import numpy as np
    import paddle

    from paddle_semoe.inference.export import export_package
    from paddle_semoe.inference.package import read_manifest
    from paddle_semoe.inference.runner import InferenceModel, ServeConfig
    from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings

    logging.basicConfig(level=logging.WARNING)
    tmp = tempfile.TemporaryDirectory(prefix="bench_infer_", dir=args.workdir)
    work = Path(tmp.name)
    paddle.seed(0)
    cfg = GPTConfig(vocab_size=256, max_seq_len=max(args.seq, 8), d_model=args.d_model, n_layers=args.moe_layers,
                    n_heads=8, d_ff=args.d_ff, moe_every=1, moe=MoESettings(num_experts=args.experts, top_k=2))
    model = GPTMoE(cfg)
    pkg = export_package(model, work / "pkg", graphs=False)
    del model
    man = read_manifest(pkg)
    n = len(man.sections)
    section_mb = man.max_section_bytes / 2**20
    print(f"model: {n} MoE layers x {args.experts} experts (D={args.d_model}, F={args.d_ff}); "
          f"{section_mb:.1f} MiB of experts per layer, {man.expert_bytes / 2**20:.0f} MiB in all; ring K={args.slots}")

    modes = {
        "resident": ServeConfig(mode="resident", source="disk"),
        "ring": ServeConfig(mode="ring", num_slots=args.slots, source="disk", direct_io=True),
        "naive": ServeConfig(mode="naive", source="disk", direct_io=True),
    }
    if args.warm:
        modes["ring_warm"] = ServeConfig(mode="ring", num_slots=args.slots, source="disk", direct_io=False)
    runners = {name: InferenceModel.load(man, serve) for name, serve in modes.items()}
    resident_bytes = {name: r.experts.resident_expert_bytes() for name, r in runners.items()}

    sweep = []
    rng = np.random.default_rng(0)
    for T in [int(t) for t in args.tokens.split(",")]:
        S = 1 if T < args.seq else args.seq
        B = max(T // S, 1)
        x = paddle.to_tensor(rng.integers(0, 256, (B, S)).astype(np.int64))
        point = {"tokens": B * S, "batch": B, "seq": S, "modes": {}}
        for name, runner in runners.items():
            runner.forward(x)  # warm-up (and, for the ring, a full cycle of loads)
            st = runner.experts.stats
            loads0, load_s0, wait0 = st.loads, st.load_s, st.wait_s
            times = []
            for _ in range(args.passes):
                t0 = time.perf_counter()
                runner.forward(x)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            loads = max(st.loads - loads0, 1)
            point["modes"][name] = {
                "pass_s": med,
                "tokens_per_s": B * S / med,
                "load_per_layer_s": (st.load_s - load_s0) / loads if st.loads > loads0 else 0.0,
                "wait_per_pass_s": (st.wait_s - wait0) / args.passes,
            }
        load_layer = point["modes"]["naive"]["load_per_layer_s"]
        compute_layer = point["modes"]["resident"]["pass_s"] / n
        point["load_per_layer_s"] = load_layer
        point["compute_per_layer_s"] = compute_layer
        point["bound_pass_s"] = n * max(load_layer, compute_layer)
        r = point["modes"]
        point["ring_vs_resident"] = r["ring"]["tokens_per_s"] / r["resident"]["tokens_per_s"]
        point["ring_vs_naive"] = r["ring"]["tokens_per_s"] / r["naive"]["tokens_per_s"]
        sweep.append(point)
        print(f"T={B * S:5d}: load/layer {1e3 * load_layer:6.1f} ms  compute/layer {1e3 * compute_layer:6.1f} ms  "
              f"ring/resident {point['ring_vs_resident']:.2f}  ring/naive {point['ring_vs_naive']:.2f}", flush=True)
    for r in runners.values():
        r.close()

    ok = [s for s in sweep if s["ring_vs_resident"] >= 0.85]
    if args.headline_tokens is not None:
        head = next(s for s in sweep if s["tokens"] == args.headline_tokens)
    else:
        head = max(ok or sweep, key=lambda s: s["ring_vs_naive"])
    report = {
        "config": {"d_model": args.d_model, "d_ff": args.d_ff, "experts": args.experts, "moe_layers": n,
                   "slots": args.slots, "threads": args.threads, "io": "O_DIRECT (cold)",
                   "section_bytes": man.max_section_bytes, "expert_bytes": man.expert_bytes},
        "headline_tokens_per_forward": head["tokens"],
        "results": {name: {"tokens_per_s": head["modes"][name]["tokens_per_s"],
                           "resident_expert_bytes": resident_bytes[name]} for name in ("resident", "ring", "naive")},
        "memory_saving": 1.0 - resident_bytes["ring"] / resident_bytes["resident"],
        "sweep": sweep,
    }
    print(format_table(report, resident_bytes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    tmp.cleanup()
    return report


def format_table(r: dict, resident_bytes: dict) -> str:
    c = r["config"]
    names = list(r["sweep"][0]["modes"])
    lines = [
        "",
        f"tokens/s per forward pass, {c['moe_layers']} MoE layers, experts streamed with {c['io']}, ring K={c['slots']}",
        f"{'tokens':>6} " + " ".join(f"{n:>10}" for n in names)
        + f" {'load/L ms':>9} {'comp/L ms':>9} {'bound ms':>9} {'ring/res':>8} {'ring/naive':>10}",
    ]
    for s in r["sweep"]:
        lines.append(
            f"{s['tokens']:>6} " + " ".join(f"{s['modes'][n]['tokens_per_s']:>10.0f}" for n in names)
            + f" {1e3 * s['load_per_layer_s']:>9.1f} {1e3 * s['compute_per_layer_s']:>9.1f} {1e3 * s['bound_pass_s']:>9.0f}"
            + f" {s['ring_vs_resident']:>8.2f} {s['ring_vs_naive']:>10.2f}"
        )
    lines.append(
        "resident expert memory: " + ", ".join(f"{n} {resident_bytes[n] / 2**20:.0f} MiB" for n in names)
        + f"  (ring saves {100 * r['memory_saving']:.0f}%)"
    )
    lines.append(f"headline: {r['headline_tokens_per_forward']} tokens per forward")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
