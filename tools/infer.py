#!/usr/bin/env python
"""Batch text generation with a GPT-MoE inference package, in one or several serving modes.

    python tools/infer.py --package outputs/pkg_tiny --prompt "The import statement" --prompt "A class" \
        --max-new-tokens 48 --modes resident,ring:2,naive
    python tools/infer.py --package outputs/pkg_tiny --paddle-inference --modes ring:1   # through Paddle Inference

Modes: ``resident`` (all experts in memory), ``ring:K`` (K expert slots, async loads; ``ring``
alone derives K from --budget-mb), ``naive`` (one slot, synchronous loads). Experts come from
the package files (``--source disk``, O_DIRECT unless --buffered) or from a host cache
(``--source host``). Reports tokens/s, resident expert bytes and the load/compute overlap.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_mode(text: str):
    name, _, k = text.partition(":")
    return name, (int(k) if k else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch); default: two built-in prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--modes", default="resident,ring:2,naive")
    p.add_argument("--budget-mb", type=float, default=None, help="expert memory budget for plain 'ring'")
    p.add_argument("--source", choices=("disk", "host"), default="disk")
    p.add_argument("--buffered", action="store_true", help="read sections through the page cache (no O_DIRECT)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paddle-inference", action="store_true", help="run the exported static graphs through Paddle Inference")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    from paddle_semoe.engine.launch_env import keep_freed_memory

    keep_freed_memory()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    import numpy as np

    from paddle_semoe.data import ByteTokenizer
    from paddle_semoe.inference.package import PackageError, read_manifest
    from paddle_semoe.inference.predictor import PaddleInferenceModel
    from paddle_semoe.inference.runner import InferenceModel, ServeConfig

    try:
        manifest = read_manifest(args.package)
    except PackageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tok = ByteTokenizer()
    prompts = args.prompt or ["The import statement", "A class definition"]
    enc = [tok.encode(t) for t in prompts]
    width = max(len(e) for e in enc)
    batch = np.array([[32] * (width - len(e)) + e for e in enc], dtype=np.int64)  # left-pad with spaces
    rows = []
    for spec in args.modes.split(","):
        mode, k = parse_mode(spec)
        budget = int(args.budget_mb * 2**20) if args.budget_mb else None
        serve = ServeConfig(mode=mode, num_slots=k, budget_bytes=budget, source=args.source, direct_io=not args.buffered)
        runner = (PaddleInferenceModel(manifest, serve, threads=args.threads) if args.paddle_inference
                  else InferenceModel.load(manifest, serve))
        try:
            res = runner.generate(batch, args.max_new_tokens, greedy=not args.sample, temperature=args.temperature,
                                  top_k=args.top_k, seed=args.seed)
        finally:
            runner.close()
        ex = runner.experts
        rows.append((spec, res.tokens_per_s, ex.resident_expert_bytes(), ex.stats.overlap_ratio, ex.stats.bytes_loaded))
        print(f"--- {spec}")
        for i, text in enumerate(prompts):
            print(f"[{i}] {text!r} -> {tok.decode(res.tokens[i, width:].tolist())!r}")
    print(f"\n{'mode':<10} {'tokens/s':>9} {'resident experts':>17} {'overlap':>8} {'bytes loaded':>13}")
    for spec, tps, resident, overlap, loaded in rows:
        print(f"{spec:<10} {tps:9.1f} {resident / 2**20:14.1f} MiB {overlap:8.2f} {loaded / 2**20:10.1f} MiB")
    print(f"(all experts: {manifest.expert_bytes / 2**20:.1f} MiB in {len(manifest.sections)} MoE layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
