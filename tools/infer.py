#!/usr/bin/env python
"""Batch text generation with a GPT-MoE inference package, in one or several serving modes.

    python tools/infer.py --package outputs/pkg_tiny --prompt "The import statement" --prompt "A class" \
        --max-new-tokens 48 --modes resident,ring:2,naive
    python tools/infer.py --package outputs/pkg_tiny --paddle-inference --modes ring:1   # through Paddle Inference

Modes: ``resident`` (all experts in memory), ``ring:K`` (K layer slots, async loads; ``ring``
alone derives K from --budget-mb), ``naive`` (one slot, synchronous loads), ``cache:S`` (S
single-expert slots: only routed experts load, hot ones stay, pre-gating prefetch; ``cache``
alone derives S from --budget-mb). Experts come from the package files (``--source disk``,
O_DIRECT unless --buffered) or from a host cache (``--source host``). Reports tokens/s, resident
expert bytes, the load/compute overlap, bytes loaded and (cache) the hit rate.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch); default: two built-in prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--modes", default="resident,ring:2,naive")
    p.add_argument("--budget-mb", type=float, default=None, help="expert memory budget for plain 'ring'")
    p.add_argument("--source", choices=("disk", "host"), default="disk")
    p.add_argument("--buffered", action="store_true", help="read sections through the page cache (no O_DIRECT)")
    p.add_argument("--quant", choices=("float32", "int8", "int4"), default="float32",
                   help="cache modes: serve the int8 / int4 expert sections (export with --int8 / --int4)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paddle-inference", action="store_true", help="run the exported static graphs through Paddle Inference")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="encode/decode with this tokenizer (default: the package's tokenizer/, else bytes)")
    args = p.parse_args(argv)
    _check_args(p, args)
    from paddle_semoe.engine.launch_env import keep_freed_memory

    keep_freed_memory()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    import numpy as np

    from paddle_semoe.data.subword import TokenizerError, model_tokenizer, prompt_pad_id
    from paddle_semoe.inference.package import PackageError, read_manifest
    from paddle_semoe.inference.predictor import PaddleInferenceModel
    from paddle_semoe.inference.runner import InferenceModel, ServeConfig, parse_mode

    try:  # bad modes are refused before any file is read
        specs = [(spec, *parse_mode(spec)) for spec in args.modes.split(",")]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        manifest = read_manifest(args.package)
    except PackageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:  # the tokenizer the model was trained with travels in the package (verified SHA-256)
        tok = model_tokenizer(args.package, int(manifest.model["vocab_size"]), args.tokenizer)
    except TokenizerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompts = args.prompt or ["The import statement", "A class definition"]
    enc = tok.encode_batch(prompts)
    context = int(manifest.model["max_seq_len"])
    for i, e in enumerate(enc):
        if not e:
            print(f"error: prompt [{i}] {prompts[i]!r} is empty (encodes to no tokens)", file=sys.stderr)
            return 2
        if len(e) + args.max_new_tokens > context:
            print(f"error: prompt [{i}] has {len(e)} tokens; with --max-new-tokens {args.max_new_tokens} it needs "
                  f"{len(e) + args.max_new_tokens} positions, more than the model's context of {context}", file=sys.stderr)
            return 2
    width = max(len(e) for e in enc)
    pad = prompt_pad_id(tok)  # left-pad: EOS (a document boundary), or a space for byte models
    batch = np.array([[pad] * (width - len(e)) + e for e in enc], dtype=np.int64)
    rows = []
    if args.paddle_inference and any(mode == "cache" for _, mode, _ in specs):
        print("error: the Paddle Inference path takes layer-granular modes (resident, ring, naive), not cache",
              file=sys.stderr)
        return 2
    for spec, mode, k in specs:
        budget = int(args.budget_mb * 2**20) if args.budget_mb else None
        serve = ServeConfig(mode=mode, num_slots=k, budget_bytes=budget, source=args.source, direct_io=not args.buffered,
                            quant=args.quant if mode == "cache" else "float32")
        runner = (PaddleInferenceModel(manifest, serve, threads=args.threads) if args.paddle_inference
                  else InferenceModel.load(manifest, serve))
        try:
            res = runner.generate(batch, args.max_new_tokens, greedy=not args.sample, temperature=args.temperature,
                                  top_k=args.top_k, seed=args.seed)
        finally:
            runner.close()
        ex = runner.experts
        cs = getattr(ex, "cache_stats", None)
        rows.append((spec, res.tokens_per_s, ex.resident_expert_bytes(), ex.stats.overlap_ratio, ex.stats.bytes_loaded,
                     "-" if cs is None else f"{100 * cs.hit_rate:.0f}%"))
        print(f"--- {spec}")
        for i, text in enumerate(prompts):
            print(f"[{i}] {text!r} -> {tok.decode(res.tokens[i, width:].tolist())!r}")
    print(f"\n{'mode':<10} {'tokens/s':>9} {'resident experts':>17} {'overlap':>8} {'bytes loaded':>13} {'hit rate':>8}")
    for spec, tps, resident, overlap, loaded, hit in rows:
        print(f"{spec:<10} {tps:9.1f} {resident / 2**20:14.1f} MiB {overlap:8.2f} {loaded / 2**20:10.1f} MiB {hit:>8}")
    print(f"(all experts: {manifest.expert_bytes / 2**20:.1f} MiB in {len(manifest.sections)} MoE layers)")
    return 0


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line (argparse's ``error``: usage, then the message; exit 2) for values that make no sense."""
    if args.max_new_tokens < 0:
        p.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0, got {args.top_k}")
    if not math.isfinite(args.temperature) or args.temperature <= 0:
        p.error(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.budget_mb is not None and (not math.isfinite(args.budget_mb) or args.budget_mb <= 0):
        p.error(f"--budget-mb must be a finite number > 0, got {args.budget_mb}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")


if __name__ == "__main__":
    from paddle_semoe.engine.launch_env import run_entry

    sys.exit(run_entry(main, name="infer"))
