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
run with buffered reads for comparison.

``--decode`` runs the generation benchmark instead (see :func:`decode_main`): a model of many
fine-grained experts, decode steps at batch 1 and 8, an expert budget of a quarter of all
experts, layer-granular ring vs the expert cache (float32 and int8) vs all-resident. Each row also shows the measured per-layer load
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
    if argv is None:
        argv = sys.argv[1:]
    if "--decode" in argv:
        return decode_main([a for a in argv if a != "--decode"])
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
    _prepare_process(args.threads)
    import numpy as np
    import paddle

    from paddle_semoe.inference.export import export_package
    from paddle_semoe.inference.package import read_manifest
    from paddle_semoe.inference.runner import InferenceModel, ServeConfig

    tmp = tempfile.TemporaryDirectory(prefix="bench_infer_", dir=args.workdir)
    work = Path(tmp.name)
    model = _random_model(max(args.seq, 8), args.d_model, args.moe_layers, args.d_ff, args.experts, top_k=2)
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



def _prepare_process(threads: int) -> None:
    """Before Paddle's first op: keep freed memory mapped, pin the math threads, quiet logs."""
    import logging

    from paddle_semoe.engine.launch_env import keep_freed_memory

    keep_freed_memory()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    logging.basicConfig(level=logging.WARNING)


def _random_model(max_seq_len: int, d_model: int, moe_layers: int, d_ff: int, experts: int, top_k: int):
    """The benchmark's GPT-MoE: every block an MoE block, random weights (seed 0), byte vocabulary."""
    import paddle

    from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings

    paddle.seed(0)
    return GPTMoE(GPTConfig(vocab_size=256, max_seq_len=max_seq_len, d_model=d_model, n_layers=moe_layers, n_heads=8,
                            d_ff=d_ff, moe_every=1, moe=MoESettings(num_experts=experts, top_k=top_k)))


# ----------------------------------------------------------------------------- decode benchmark
def decode_main(argv) -> dict:
    """Decode (generation) benchmark: tokens/s of decode steps against all-resident, at batch 1
    and 8, with the expert budget a quarter of all experts.

    Modes: ``resident`` (every expert in memory), ``ring`` (layer-granular ring, K layers at the
    budget), ``cache`` (single-expert slots at the budget, LFU-decay, pre-gating prefetch),
    ``cache_noprefetch``, ``cache_int8`` / ``cache_int4`` (int8 / int4 sections; int4 only when asked). Per mode: tokens/s, ratio to resident,
    cache hit rate (live: a prefetched expert counts as a hit; load-based: 1 - loads / requests,
    every load counted, wasted prefetches included) against Belady's offline optimum on the same
    routing trace (the load-based rate is the comparable one: MIN minimizes loads, also against
    any prefetching), the replay of every eviction policy of inference/cache_policy.py on that
    trace (float32 cache mode, JSON ``policy_replay``), pre-gating
    precision/recall, bytes read per token, and the exposed load time (compute waiting for
    loads) against the I/O floor = bytes read / the O_DIRECT bandwidth measured in this run.
    """
    p = argparse.ArgumentParser(description=decode_main.__doc__)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=256, help="per-expert hidden size (fine-grained experts)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-layers", type=int, default=8)
    p.add_argument("--budget", type=float, default=0.25, help="expert memory budget as a share of all experts")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=32, help="decode steps timed per batch size")
    p.add_argument("--modes", default="resident,ring,cache,cache_noprefetch,cache_int8")
    p.add_argument("--sharpen", type=float, default=8.0,
                   help="scale the random router weights (a trained router is far from uniform)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quality-package", type=Path, default=None,
                   help="measure int8 vs float32 (held-out loss, greedy agreement) on this package (exported with "
                        "--int8, byte vocabulary) instead of the benchmark's random model")
    p.add_argument("--package", type=Path, default=None,
                   help="run on this inference package (e.g. a trained model, exported with --int8 for cache_int8) "
                        "instead of the random benchmark model; its prompts are windows of the held-out text "
                        "(byte vocabulary), so the routing is a trained router's")
    p.add_argument("--prompt-sets", type=int, default=1,
                   help="prompt sets per batch size; each mode's figures are pooled over them (tokens/s over all "
                        "steps, hit rates averaged), for hit rates that do not hang on one prompt")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.prompt_sets < 1:
        p.error(f"--prompt-sets must be >= 1, got {args.prompt_sets}")
    _prepare_process(args.threads)
    import numpy as np
    import paddle

    from paddle_semoe.data.corpus import load_split
    from paddle_semoe.inference.cache import ExpertGeometry, belady_hit_rate, routing_requests
    from paddle_semoe.inference.quality import compare_serving
    from paddle_semoe.inference.export import export_package
    from paddle_semoe.inference.package import PackageError, aligned_buffer, read_manifest
    from paddle_semoe.inference.runner import InferenceModel, ServeConfig

    tmp = tempfile.TemporaryDirectory(prefix="bench_decode_", dir=args.workdir)
    work = Path(tmp.name)
    held = load_split().val.astype(np.int64)
    if args.package is not None:
        try:
            man = read_manifest(args.package)
        except PackageError as err:
            raise SystemExit(f"--package: {err}") from None
        need = max(int(held.max()) + 1, 256)
        if int(man.model["vocab_size"]) < need:
            raise SystemExit(f"--package {args.package}: the prompts are held-out bytes, so the model needs "
                             f"vocab_size >= {need}, got {man.model['vocab_size']}")
        if int(man.model["max_seq_len"]) < args.prompt + args.new:
            raise SystemExit(f"--package {args.package}: max_seq_len {man.model['max_seq_len']} is shorter than "
                             f"--prompt + --new = {args.prompt + args.new}")
        missing = [q for q in ("int8", "int4") if f"cache_{q}" in args.modes and not getattr(man, f"{q}_sections")]
        if missing:
            raise SystemExit(f"--package {args.package} has no {'/'.join(missing)} expert sections for the "
                             f"cache_{missing[0]} mode: export it with tools/export.py --{missing[0]}")
        top_k = int(man.model["moe"]["top_k"])
    else:
        model = _random_model(args.prompt + args.new + 8, args.d_model, args.moe_layers, args.d_ff, args.experts, args.top_k)
        with paddle.no_grad():
            for layer in model.moe_layers():
                layer.router.weight.set_value(layer.router.weight * args.sharpen)
        pkg = export_package(model, work / "pkg", graphs=False, int8="cache_int8" in args.modes, int4="cache_int4" in args.modes)
        del model
        man = read_manifest(pkg)
        top_k = args.top_k
    geo = ExpertGeometry.of(man)
    n_all = geo.layers * geo.experts
    budget = int(args.budget * man.expert_bytes)
    bw = _odirect_bandwidth(man, geo, aligned_buffer)
    print(f"model: {args.package or 'random weights'}: {geo.layers} MoE layers x {geo.experts} experts (D={geo.d_model}, "
          f"F={geo.d_ff}, top-{top_k}); "
          f"{geo.streamed_bytes / 2**20:.2f} MiB per expert, {man.expert_bytes / 2**20:.0f} MiB in all; budget "
          f"{budget / 2**20:.0f} MiB ({100 * args.budget:.0f}%); O_DIRECT bandwidth {bw / 2**30:.2f} GiB/s", flush=True)
    serves = {
        "resident": ServeConfig(mode="resident", source="disk"),
        "ring": ServeConfig(mode="ring", budget_bytes=budget, source="disk", direct_io=True),
        "cache": ServeConfig(mode="cache", budget_bytes=budget, source="disk", direct_io=True, record_routing=True),
        "cache_noprefetch": ServeConfig(mode="cache", budget_bytes=budget, source="disk", direct_io=True, prefetch=False,
                                        record_routing=True),
        "cache_int8": ServeConfig(mode="cache", budget_bytes=budget, source="disk", direct_io=True, quant="int8",
                                  record_routing=True),
        "cache_int4": ServeConfig(mode="cache", budget_bytes=budget, source="disk", direct_io=True, quant="int4",
                                  record_routing=True),
    }
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in serves]
    if unknown:
        raise SystemExit(f"unknown decode modes {unknown}; choose from {list(serves)}")
    if "ring" in modes and budget < man.max_section_bytes:
        print(f"ring skipped: the budget ({budget} B) is below one MoE layer's experts ({man.max_section_bytes} B)")
        modes.remove("ring")
    rng = np.random.default_rng(0)
    results = []
    for B in [int(b) for b in args.batches.split(",")]:
        if args.package is not None:  # held-out text: what a trained router routes
            prompt_sets = [np.stack([held[s:s + args.prompt] for s in rng.integers(0, len(held) - args.prompt, B)])
                           for _ in range(args.prompt_sets)]
        else:
            prompt_sets = [rng.integers(0, 256, (B, args.prompt)).astype(np.int64) for _ in range(args.prompt_sets)]
        row = {"batch": B, "modes": {}}
        for name in modes:
            runs = []
            for prompts in prompt_sets:  # a fresh (cold) model per prompt set
                m = InferenceModel.load(man, serves[name])
                try:
                    runs.append(_time_decode(m, prompts, args.new, geo, belady_hit_rate, routing_requests, bw))
                finally:
                    m.close()
            row["modes"][name] = r = _pool_runs(runs)
            print(f"B={B} {name:<17} {r['tokens_per_s']:8.1f} tok/s  hit {r.get('hit_rate', float('nan')):.2f} "
                  f"load-hit {r.get('load_hit_rate', float('nan')):.2f} (Belady {r.get('belady_hit_rate', float('nan')):.2f})  "
                  f"{r['bytes_per_token'] / 2**20:7.2f} MiB/token  "
                  f"exposed {r['exposed_load_s']:.3f}s vs floor {r['io_floor_s']:.3f}s", flush=True)
        res = row["modes"].get("resident")
        for r in row["modes"].values():
            r["vs_resident"] = r["tokens_per_s"] / res["tokens_per_s"] if res else float("nan")
        results.append(row)
    quality = None
    if "cache_int8" in modes:
        qman = read_manifest(args.quality_package) if args.quality_package else man
        seq = min(48, int(qman.model["max_seq_len"]) - 1)
        q = compare_serving(qman, ServeConfig(mode="resident", source="host"),
                            ServeConfig(mode="cache", num_slots=ExpertGeometry.of(qman).experts * 2, source="host",
                                        quant="int8"),
                            held, seq_len=seq, windows=8, prompts=held[:4 * 8].reshape(4, 8),
                            new_tokens=min(32, int(qman.model["max_seq_len"]) - 8))
        quality = {"package": str(args.quality_package or args.package or "benchmark model (random weights)"), **q.to_dict()}
        print(f"int8 vs float32 ({quality['package']}): held-out loss {q.loss_ref:.4f} -> {q.loss_test:.4f} "
              f"({q.loss_delta:+.4f} nats), greedy-token agreement {100 * q.token_agreement:.1f}%, "
              f"max |logit diff| {q.max_abs_logit_diff:.3g}", flush=True)
    report = {
        "int8_quality": quality,
        "config": {"package": str(args.package) if args.package else None, "prompt_sets": args.prompt_sets,
                   "d_model": geo.d_model, "d_ff": geo.d_ff, "experts": geo.experts, "top_k": top_k,
                   "moe_layers": geo.layers, "expert_bytes": man.expert_bytes, "budget_bytes": budget,
                   "budget_share": args.budget, "threads": args.threads, "io": "O_DIRECT (cold)",
                   "odirect_bandwidth_Bps": bw, "prompt": args.prompt, "decode_steps": args.new,
                   "router_sharpen": None if args.package else args.sharpen, "total_experts": n_all},
        "decode": results,
    }
    print(format_decode_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    tmp.cleanup()
    return report


def _odirect_bandwidth(man, geo, aligned_buffer, threads: int = 4) -> float:
    """Bytes/s of O_DIRECT reads of expert-sized ranges (every expert's w1 and w2 of every
    layer), ``threads`` reads in flight as the cache's loaders keep them: the disk's rate for
    the cache's access pattern, measured cold in this run."""
    from concurrent.futures import ThreadPoolExecutor

    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    jobs = [(s, name, e) for s in man.sections for name in ("w1", "w2") for e in range(geo.experts)]

    def read(chunk):
        buf = aligned_buffer(geo.matrix_bytes + 8192)
        n = 0
        fds = {}
        try:
            for s, name, e in chunk:
                fd = fds.get(s.file)
                if fd is None:
                    fd = fds[s.file] = os.open(man.root / s.file, flags)
                off, nb = s.expert_range(name, e)
                start = off - off % 4096
                length = (off + nb + 4095) // 4096 * 4096 - start
                n += os.preadv(fd, [memoryview(buf)[:length]], start)
        finally:
            for fd in fds.values():
                os.close(fd)
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        total = sum(ex.map(read, [jobs[i::threads] for i in range(threads)]))
    return total / (time.perf_counter() - t0)


def _time_decode(m, prompts, steps, geo, belady_hit_rate, routing_requests, bw) -> dict:
    import numpy as np
    import paddle

    logits, caches = m.forward(paddle.to_tensor(prompts))
    nxt = logits[:, -1, :].numpy().argmax(-1)
    ex = m.experts
    st = ex.stats
    cs = getattr(ex, "cache_stats", None)
    loads0, bytes0, wait0 = st.loads, st.bytes_loaded, st.wait_s
    acc0 = (cs.accesses, cs.hits, cs.predicted, cs.predicted_used, cs.used_after_prediction, cs.misses,
            cs.prefetch_loads) if cs else None
    route0 = len(ex.routing) if cs is not None else 0
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, caches = m.forward(paddle.to_tensor(nxt[:, None].astype(np.int64)), caches)
        nxt = logits[:, -1, :].numpy().argmax(-1)
    dt = time.perf_counter() - t0
    B = prompts.shape[0]
    nbytes = st.bytes_loaded - bytes0
    r = {"tokens_per_s": B * steps / dt, "seconds": dt, "loads": st.loads - loads0, "bytes_read": nbytes,
         "bytes_per_token": nbytes / (B * steps), "exposed_load_s": st.wait_s - wait0, "io_floor_s": nbytes / bw,
         "resident_expert_bytes": ex.resident_expert_bytes()}
    r["exposed_vs_floor"] = r["exposed_load_s"] / r["io_floor_s"] if r["io_floor_s"] > 0 else float("nan")
    if cs is not None:
        acc, hits = cs.accesses - acc0[0], cs.hits - acc0[1]
        loads = (cs.misses - acc0[5]) + (cs.prefetch_loads - acc0[6])  # issued: demand misses + prefetches
        r["hit_rate"] = hits / acc if acc else 0.0  # live: a prefetched expert in its slot counts
        r["load_hit_rate"] = 1.0 - loads / acc if acc else 0.0  # every load counted: comparable with Belady
        r["prefetch_loads"] = cs.prefetch_loads - acc0[6]
        # Belady replays the same decode trace (routing during prefill warmed both the same way)
        reqs = routing_requests(ex.routing, geo.experts)
        r["belady_hit_rate"] = _belady_window(reqs, route0, ex.num_slots, belady_hit_rate)
        if ex.quant == "float32" and ex.predictions:  # every eviction policy replayed on this trace
            from paddle_semoe.inference.cache_policy import Trace, compare

            trace = Trace.of(geo.layers, geo.experts, ex.routing, ex.predictions, start=route0)
            r["policy_replay"] = compare(trace, ex.num_slots)
        pred, used, after = cs.predicted - acc0[2], cs.predicted_used - acc0[3], cs.used_after_prediction - acc0[4]
        r["pregate_precision"] = used / pred if pred else float("nan")
        r["pregate_recall"] = used / after if after else float("nan")
        r["slots"] = ex.num_slots
    return r


_SUMMED = ("seconds", "loads", "bytes_read", "exposed_load_s", "io_floor_s", "prefetch_loads", "tokens")


def _pool_runs(runs: list[dict]) -> dict:
    """One mode's figures over several prompt sets: tokens/s over all steps, bytes and load
    times summed, rates (hit, load-based hit, Belady, pre-gating) and replayed policies averaged."""
    for r in runs:
        r["tokens"] = r["tokens_per_s"] * r["seconds"]
    if len(runs) == 1:
        return {**runs[0], "prompt_sets": 1}
    out = {k: sum(r[k] for r in runs) for k in _SUMMED if k in runs[0]}
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    out["bytes_per_token"] = out["bytes_read"] / out["tokens"]
    out["exposed_vs_floor"] = out["exposed_load_s"] / out["io_floor_s"] if out["io_floor_s"] > 0 else float("nan")
    for k in ("hit_rate", "load_hit_rate", "belady_hit_rate", "pregate_precision", "pregate_recall"):
        if k in runs[0]:
            out[k] = float(sum(r[k] for r in runs) / len(runs))
    for k in ("resident_expert_bytes", "slots"):
        if k in runs[0]:
            out[k] = runs[0][k]
    if "policy_replay" in runs[0]:
        out["policy_replay"] = {
            name: {m: sum(r["policy_replay"][name][m] for r in runs) / len(runs) for m in ("hit", "load")}
            for name in runs[0]["policy_replay"]
        }
    out["prompt_sets"] = len(runs)
    return out


def _belady_window(reqs, start, capacity, belady_hit_rate) -> float:
    """Belady hit rate over requests[start:], the whole trace replayed (MIN minimizes the misses of
    every prefix too, so this is the optimum's count for the window after an optimal warm-up)."""
    return belady_hit_rate(reqs, capacity, start=start)


def format_decode_table(r: dict) -> str:
    c = r["config"]
    lines = ["", f"decode tokens/s, {c['moe_layers']} MoE layers x {c['experts']} experts (top-{c['top_k']}), budget "
                 f"{100 * c['budget_share']:.0f}% of experts, {c['io']}, disk {c['odirect_bandwidth_Bps'] / 2**30:.2f} GiB/s",
             f"{'B':>2} {'mode':<17} {'tok/s':>8} {'x res':>6} {'hit':>5} {'ld-hit':>6} {'Belady':>6} {'pre-P':>5} {'pre-R':>5} "
             f"{'MiB/tok':>8} {'exposed s':>9} {'floor s':>8} {'exp/floor':>9}"]
    for row in r["decode"]:
        for name, m in row["modes"].items():
            f = lambda k, fmt="{:.2f}": fmt.format(m[k]) if k in m else "-"  # noqa: E731
            lines.append(f"{row['batch']:>2} {name:<17} {m['tokens_per_s']:>8.1f} {m['vs_resident']:>6.2f} {f('hit_rate'):>5} "
                         f"{f('load_hit_rate'):>6} {f('belady_hit_rate'):>6} {f('pregate_precision'):>5} {f('pregate_recall'):>5} "
                         f"{m['bytes_per_token'] / 2**20:>8.2f} {m['exposed_load_s']:>9.3f} {m['io_floor_s']:>8.3f} "
                         f"{m['exposed_vs_floor']:>9.2f}")
    for row in r["decode"]:  # the eviction policies replayed on the float32 cache's trace
        rep = next((m["policy_replay"] for m in row["modes"].values() if "policy_replay" in m), None)
        if rep is None:
            continue
        lines += ["", f"B={row['batch']}: eviction policies replayed on the cache's decode trace (Belady "
                      f"{rep['belady']['load']:.2f}, best fixed set in hindsight {rep['static_optimum']['load']:.2f}): "
                      "load-based hit rate demand-paged | with pre-gating prefetch: live, load-based"]
        for name in (n for n in rep if n not in ("belady", "static_optimum") and not n.endswith("+prefetch")):
            d, pf = rep[name], rep.get(name + "+prefetch", {"hit": float("nan"), "load": float("nan")})
            lines.append(f"   {name:<32} {d['load']:>6.2f} | {pf['hit']:>5.2f} {pf['load']:>6.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
