#!/usr/bin/env python3
"""Standalone check of the CUDA launchers (no Paddle): build, verify against NumPy, time.

  python tools/gpu_check/check.py                 # on a GPU machine: full checks + timings
  python tools/gpu_check/check.py --emulate-cpu   # anywhere: same driver over the CPU kernels

Steps: build the shim library (nvcc over custom_ops/cuda/*.cu + shim.cu, or g++ over the CPU
kernels with --emulate-cpu); run every correctness case (cases.py, including the fused
all-to-all's permutation launcher and a simulated EP group); measure a large device-to-device
copy and time dispatch/combine and their grads and the row permutation (timing.py); write JSON
(--json, default $OUT/gpu_check.json when $OUT is set); print a short table last.
Exit status: 0 all checks passed, 1 a check failed, 2 the build or the device failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the gpu_check package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_check import cases, native, timing  # noqa: E402

logger = logging.getLogger("gpu_check")

# Shapes timed on a GPU: the acceptance shape (bf16 and fp32) and a smaller one.
GPU_TIMED = [(16384, 4096, 64, 2, "bfloat16"), (16384, 4096, 64, 2, "float32"),
             (4096, 1024, 16, 2, "bfloat16")]
CPU_TIMED = [(256, 64, 8, 2, "float32")]
# The fused all-to-all's row permutation (R rows, D elements, B blocks): the acceptance
# shape's dispatch rows over 64 experts, and a 1024-block table (several launches).
GPU_PERMUTE = [(32768, 4096, 64, "bfloat16"), (32768, 4096, 1024, "bfloat16")]
CPU_PERMUTE = [(512, 64, 16, "float32")]
ACCEPT_SHAPE = (16384, 4096, 64, 2)
ACCEPT_PCT = 60.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--emulate-cpu", action="store_true",
                   help="use the CPU kernels (host memory) instead of the CUDA launchers; "
                        "timings are then meaningless")
    p.add_argument("--profile", choices=("small", "full"), default=None,
                   help="correctness cases: small, or full (adds the large shapes); "
                        "default full on a GPU, small with --emulate-cpu")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write the JSON report (default $OUT/gpu_check.json if OUT "
                        "is set, else none)")
    p.add_argument("--no-timing", action="store_true", help="skip the timings")
    p.add_argument("--reps", type=int, default=30, help="timed repetitions per op")
    p.add_argument("--warmup", type=int, default=5, help="warm-up runs per op")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from time)")
    p.add_argument("--arch", default=None, help="nvcc target, e.g. sm_90 (default: detected)")
    p.add_argument("--lib", type=Path, default=None, help="use this prebuilt shim library")
    p.add_argument("--build-dir", type=Path, default=None, help="where builds are cached")
    p.add_argument("--verbose", "-v", action="store_true", help="log every passing check")
    return p.parse_args(argv)


def format_table(report: dict) -> str:
    lines = []
    passed, total = report["checks_passed"], report["checks_total"]
    lines.append(f"== gpu_check: {passed}/{total} checks passed | {report['device']} | "
                 f"{report['elapsed_s']:.0f} s ==")
    for r in report["checks"]:
        if not r["ok"]:
            lines.append(f"FAIL {r['op']} | {r['case']} | {r['check']}: {r['detail']}"[:300])
    smoke = report.get("nccl_smoke")
    if smoke:
        lines.append(f"nccl smoke (fused all-to-all, one rank): {smoke['status'].upper()}: "
                     f"{smoke['detail']}"[:300])
    cb = report.get("copy_bandwidth")
    if cb:
        lines.append(f"copy D2D {cb['bytes'] / 2**20:.0f} MiB: {cb['median_ms']:.3f} ms, "
                     f"{cb['gbps']:.0f} GB/s (read+write)")
    if report.get("timings"):
        if report["emulated"]:
            lines.append("CPU EMULATION: timings below are host times of the CPU kernels and "
                         "say nothing about the GPU")
        hdr = (f"{'op':<19} {'dtype':<8} {'shape':<24} {'median_us':>10} {'min_us':>9} "
               f"{'floor_MB':>9} {'GB/s':>7} {'%copy':>6}  target")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for t in report["timings"]:
            target = ""
            if t.get("target_pct") is not None:
                target = (f">={t['target_pct']:.0f}% " +
                          ("MET" if t["pct_copy"] >= t["target_pct"] else "MISSED"))
            lines.append(f"{t['op']:<19} {t['dtype']:<8} {t['shape']:<24} {t['median_us']:>10.1f} "
                         f"{t['min_us']:>9.1f} {t['floor_bytes'] / 1e6:>9.1f} {t['gbps']:>7.0f} "
                         f"{t['pct_copy']:>5.1f}%  {target}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    t_start = time.perf_counter()
    emulate = args.emulate_cpu
    profile = args.profile or ("small" if emulate else "full")
    seed = args.seed if args.seed is not None else int(time.time()) % (2**31)
    json_path = args.json
    if json_path is None and os.environ.get("OUT"):
        json_path = Path(os.environ["OUT"]) / "gpu_check.json"

    try:
        lib = args.lib or native.build_library("cpu" if emulate else "cuda", args.build_dir,
                                               args.arch)
        shim = native.Shim(lib)
        device = shim.device_name()
    except (native.BuildError, native.ShimError, OSError) as exc:
        print(f"gpu_check: cannot build or load the shim library: {exc}", file=sys.stderr)
        return 2
    print(f"gpu_check: {device}; library {lib.name}; profile {profile}; seed {seed}",
          file=sys.stderr, flush=True)

    suite = cases.Suite(shim, seed)
    cases.run_suite(suite, profile)
    smoke = {"status": "skipped", "detail": "device in an error state"}
    if not suite.broken:
        smoke = cases.nccl_smoke(suite)
    passed, total = cases.summary(suite.results)

    report: dict = {
        "device": device, "emulated": shim.emulated, "profile": profile, "seed": seed,
        "library": str(lib), "host": platform.node(),
        "checks_passed": passed, "checks_total": total,
        "checks": [vars(r) for r in suite.results],
        "timings": [], "copy_bandwidth": None, "nccl_smoke": smoke,
    }
    if not args.no_timing and not suite.broken:
        try:
            reps = 2 if emulate else args.reps
            warm = 1 if emulate else args.warmup
            copy_bytes = (8 << 20) if emulate else (1 << 30)
            gbps, med = timing.copy_bandwidth(shim, copy_bytes, warm, max(reps, 5))
            report["copy_bandwidth"] = {"bytes": copy_bytes, "median_ms": med, "gbps": gbps}
            flush = None if emulate else shim.alloc(timing.FLUSH_BYTES)
            for T, D, E, K, dtype in (CPU_TIMED if emulate else GPU_TIMED):
                for t in timing.time_routing_ops(shim, T, D, E, K, dtype, gbps, warm, reps,
                                                 seed, flush):
                    d = t.as_dict()
                    if (T, D, E, K) == ACCEPT_SHAPE and t.op in ("gate_dispatch", "combine"):
                        d["target_pct"] = ACCEPT_PCT
                    report["timings"].append(d)
            for R, D, B, dtype in (CPU_PERMUTE if emulate else GPU_PERMUTE):
                report["timings"].append(timing.time_permute(shim, R, D, B, dtype, gbps, warm,
                                                             reps, seed, flush).as_dict())
        except native.ShimError as exc:
            logger.error("timing failed: %s", exc)
            report["timing_error"] = str(exc)
    report["elapsed_s"] = time.perf_counter() - t_start

    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1, default=float))
        print(f"gpu_check: wrote {json_path}", file=sys.stderr)
    print(format_table(report), flush=True)
    if suite.broken:
        return 2
    if passed < total:
        return 1
    return 2 if report.get("timing_error") else 0


if __name__ == "__main__":
    sys.exit(main())
