#!/usr/bin/env python
"""Forward+backward tokens/s of one MoE layer: custom ops vs reference vs einsum vs the floor.

    python tools/bench_moe.py --d-model 512 --d-ff 2048 --experts 8 --top-k 2 \
        --capacity-factor 1.25 --tokens 4096 --steps 5 --threads 2 --json bench_moe.json
    python tools/bench_moe.py --dtypes float32,bfloat16 --paths custom   # bf16 beside float32

Paths, all on the same weights and the same input in this process:
  custom     MoELayer with the compiled ops (fused gate-dispatch, grouped FFN, combine), once per
             --dtypes entry: float32, and bfloat16 (row "custom-bf16": the expert GEMMs on
             bfloat16 operands with float32 accumulation and float32 weights, the precision
             training uses with amp.enabled=true on CPU; needs AVX512-BF16 / AMX-BF16); the
             dtypes alternate step by step, so load from other processes hits them alike
  reference  MoELayer with the pure-Paddle reference ops (per-expert matmul loop)
  einsum     GShard/DeepSpeed-style dense one-hot dispatch + bmm experts, in Paddle
  floor      expert FLOPs (fwd+bwd, T*k rows, no padding) at the best measured float32 GEMM
             rate (a bfloat16 row may pass 100% of it; "vs custom" is its speed-up over float32)
Also times the dispatch op alone against a plain memory copy of the same bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paddle_semoe.bench.timing import set_threads  # noqa: E402  (no paddle import yet)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--activation", default="gelu")
    p.add_argument("--paths", default="custom,reference,einsum")
    p.add_argument(
        "--dtypes", default="float32",
        help="GEMM precisions of the custom path, comma-separated: float32, bfloat16 (reference and einsum are float32)",
    )
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc returning freed memory to the OS")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        p.error(f"--dtypes: each entry must be one of {', '.join(DTYPES)}, got {args.dtypes}")
    return args


DTYPES = ("float32", "bfloat16")


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    from paddle_semoe.engine.launch_env import keep_freed_memory

    malloc_tuned = keep_freed_memory() if not args.no_malloc_tuning else False

    import logging

    import paddle

    from paddle_semoe import ops
    from paddle_semoe.bench.einsum_moe import einsum_moe_forward
    from paddle_semoe.bench.timing import memcpy_bandwidth, onednn_sgemm_call, onednn_sgemm_rate, paddle_matmul_rate, time_fn
    from paddle_semoe.engine.amp import cpu_gemm_mode, cpu_gemm_precision
    from paddle_semoe.engine.config import AmpConfig
    from paddle_semoe.moe import MoEConfig, MoELayer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("bench_moe")
    T, D, F, E, K = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k
    paths = [p for p in args.paths.split(",") if p]

    def make_layer(backend: str) -> MoELayer:
        paddle.seed(0)
        cfg = MoEConfig(
            d_model=D, d_ff=F, num_experts=E, gate="topk", top_k=K,
            capacity_factor=args.capacity_factor, activation=args.activation, ops_backend=backend,
        )
        return MoELayer(cfg)

    paddle.seed(1)
    x0 = paddle.randn([T, D])
    results: dict[str, dict] = {}
    # the floor GEMM is timed between the custom path's steps too, so that "% of floor" compares
    # the two at the same moment (a VM's speed drifts by 10-20% between minutes)
    rows = T * K
    floor_call = onednn_sgemm_call(rows, D, F)
    floor_gemm_s: list[float] = []
    for path in paths:
        layer = make_layer("reference" if path == "reference" else "custom")
        x = x0.clone()
        x.stop_gradient = False

        def step(layer=layer, x=x, path=path):
            if path == "einsum":
                loss = einsum_moe_forward(layer, x).mean()
            else:
                out = layer(x)
                loss = out.y.mean() + out.aux_loss
            loss.backward()
            layer.clear_gradients()
            x.clear_gradient()

        # the custom path once per dtype, the dtypes alternating step by step (a load change on a
        # shared machine hits them alike); bfloat16 = the training switch's precision
        # (amp.enabled, amp.dtype=bfloat16: the FFN GEMMs in bf16); the other paths float32
        dtypes = args.dtypes if path == "custom" else ["float32"]
        precisions = [cpu_gemm_mode(AmpConfig(enabled=d == "bfloat16", dtype="bfloat16")) for d in dtypes]
        samples: list[list[float]] = [[] for _ in dtypes]
        in_effect = list(precisions)
        for i in range(args.warmup + args.steps):
            for j, precision in enumerate(precisions):
                with cpu_gemm_precision(precision, backend="custom") as got:
                    t = time_fn(step, warmup=0, runs=1)
                in_effect[j] = got
                if i >= args.warmup:
                    samples[j].append(t.median_s)
            if path == "custom" and floor_call is not None and i >= args.warmup:
                floor_gemm_s.append(time_fn(floor_call, warmup=0, runs=1).median_s)
        for dtype, got, runs_s in zip(dtypes, in_effect, samples):
            name = path if dtype == "float32" else f"{path}-bf16"
            step_s = statistics.median(runs_s)
            results[name] = {
                "tokens_per_s": T / step_s, "step_s": step_s, "runs_s": runs_s, "dtype": dtype, "gemm_precision": got,
            }
            if path == "custom" and floor_gemm_s:
                # median over the steps of (floor step time at that moment) / (step time)
                results[name]["floor_fraction_paired"] = statistics.median(
                    3 * 2 * g / s_ for g, s_ in zip(floor_gemm_s, runs_s))
            log.info("%-12s %8.3f s/step  (GEMMs %s)", name, step_s, got)

    # compute floor: expert FLOPs for T*k rows (fwd 1x + bwd 2x, two GEMMs) at the best GEMM rate
    rate_paddle = paddle_matmul_rate(rows, D, F)
    rate_onednn = 2.0 * rows * D * F / statistics.median(floor_gemm_s) / 1e9 if floor_gemm_s else onednn_sgemm_rate(rows, D, F)
    best_rate = max(r for r in (rate_paddle, rate_onednn) if r is not None)
    expert_flops = 3 * 2 * (2.0 * rows * D * F)
    floor_s = expert_flops / (best_rate * 1e9)

    # op-level dispatch against a plain copy of the same bytes (rows written = T*k*D floats)
    logits = paddle.randn([T, E])
    disp = time_fn(
        lambda: ops.gate_dispatch(x0, logits, top_k=K, capacity_factor=args.capacity_factor, normalize=True, backend="custom"),
        warmup=2, runs=9,
    )
    copy_bytes = rows * D * 4
    copy_bw = memcpy_bandwidth(copy_bytes)
    copy_s = 2.0 * copy_bytes / copy_bw

    report = {
        "config": {
            "d_model": D, "d_ff": F, "experts": E, "top_k": K, "capacity_factor": args.capacity_factor,
            "tokens": T, "steps": args.steps, "threads": args.threads, "activation": args.activation,
            "dtypes": args.dtypes,
            "cpu_gemm_backend": ops.cpu_gemm_backend("custom"), "paddle": paddle.__version__,
            "malloc_keeps_freed_memory": malloc_tuned,
        },
        "results": results,
        "floor_tokens_per_s": T / floor_s,
        "floor": {
            "expert_gflop": expert_flops / 1e9, "gemm_gflops_paddle_matmul": rate_paddle,
            "gemm_gflops_onednn": rate_onednn, "gemm_gflops_used": best_rate, "floor_step_s": floor_s,
        },
        "dispatch_op": {"dispatch_s": disp.median_s, "memcpy_same_bytes_s": copy_s, "ratio_to_memcpy": disp.median_s / copy_s},
    }
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        log.info("wrote %s", args.json)
    return report


def format_table(r: dict) -> str:
    c = r["config"]
    floor = r["floor_tokens_per_s"]
    lines = [
        f"MoE layer fwd+bwd  T={c['tokens']} D={c['d_model']} F={c['d_ff']} E={c['experts']} k={c['top_k']} "
        f"cf={c['capacity_factor']} threads={c['threads']} gemm={c['cpu_gemm_backend']}",
        f"{'path':<12} {'s/step':>8} {'tokens/s':>10} {'% floor':>8} {'vs einsum':>9} {'vs custom':>9} {'GEMMs':>12}",
    ]
    einsum = r["results"].get("einsum", {}).get("tokens_per_s")
    custom = r["results"].get("custom", {}).get("tokens_per_s")
    for name, v in r["results"].items():
        tps = v["tokens_per_s"]
        vs = f"{tps / einsum:8.2f}x" if einsum else "       -"
        vc = f"{tps / custom:8.2f}x" if custom else "       -"
        prec = v.get("gemm_precision", "float32")
        frac = v.get("floor_fraction_paired", tps / floor)  # paired with the floor GEMM where measured so
        lines.append(f"{name:<12} {v['step_s']:8.3f} {tps:10.0f} {100 * frac:7.1f}% {vs} {vc} {prec:>12}")
    f = r["floor"]
    lines.append(
        f"{'floor':<12} {f['floor_step_s']:8.3f} {floor:10.0f} {100.0:7.1f}%   "
        f"({f['expert_gflop']:.1f} GFLOP at {f['gemm_gflops_used']:.0f} GFLOP/s; paddle.matmul "
        f"{f['gemm_gflops_paddle_matmul']:.0f}, oneDNN {f['gemm_gflops_onednn'] or 0:.0f})"
    )
    d = r["dispatch_op"]
    lines.append(
        f"dispatch op {1e3 * d['dispatch_s']:.2f} ms vs memcpy of the same bytes {1e3 * d['memcpy_same_bytes_s']:.2f} ms "
        f"({d['ratio_to_memcpy']:.2f}x)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
