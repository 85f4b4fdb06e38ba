#!/usr/bin/env python
"""Do the experts pay? Dense vs MoE at equal active FLOPs per token, on BPE-tokenized text.

    python tools/bench_quality.py --steps 400 --eval_every 50 --json outputs/bench_quality/quality.json
    python tools/bench_quality.py --steps 6 --eval_every 3 --out outputs/bench_quality_smoke     # smoke

Variants (each a real tools/train.py job on the same prepared data, same seed, same tokens):

  dense        every FFN dense, hidden width F
  moe_top1     MoE FFN in every other block: E experts of width F, top-1 routing
  moe_top2     MoE FFN in every other block: E experts of width F/2, top-2 routing

A token passes through one F-wide FFN (or two F/2-wide ones) in every block of every variant,
so the active FLOPs per token are equal (up to the router's d_model x E matmul); the MoE
variants hold more parameters. The data is the Python documentation that ships with Python,
tokenized by a byte-level BPE trained on it (``--vocab``); it is prepared on first use.

Reports held-out loss curves (PNG), the final held-out losses, and the step at which each MoE
variant first reaches the dense model's final held-out loss (linear interpolation between
evaluations; ``null`` when it never does). Writes a JSON file with every curve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def variants(d_ff: int, experts: int) -> dict[str, list[str]]:
    return {
        "dense": ["model.moe_every=0", f"model.d_ff={d_ff}"],
        "moe_top1": [f"model.d_ff={d_ff}", f"model.moe.num_experts={experts}", "model.moe.gate=topk", "model.moe.top_k=1",
                     f"model.moe.d_ff={d_ff}"],
        "moe_top2": [f"model.d_ff={d_ff}", f"model.moe.num_experts={experts}", "model.moe.gate=topk", "model.moe.top_k=2",
                     f"model.moe.d_ff={d_ff // 2}"],
    }


def ensure_dataset(path: Path, vocab: int) -> None:
    """Prepare the BPE-tokenized Python documentation at ``path`` unless it is already there."""
    if (path / "manifest.json").exists():
        return
    cmd = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--input", "builtin:python_docs", "--output", str(path),
           "--bpe_vocab_size", str(vocab), "--quiet"]
    subprocess.run(cmd, check=True, cwd=REPO)


def run_variant(name: str, overrides: list[str], args: argparse.Namespace, vocab: int) -> dict:
    out = args.out / name
    threads = args.threads
    common = [
        f"model.vocab_size={vocab}", f"data.datasets=[{{path: {args.dataset.resolve()}, weight: 1.0}}]",
        "parallel.ep_degree=1", f"train.output_dir={out}", f"train.max_steps={args.steps}",
        f"train.eval_every={args.eval_every}", f"train.eval_batches={args.eval_batches}", f"train.log_every={args.eval_every}",
        "train.save_every=0", f"train.seed={args.seed}", "monitor.visualdl=false", "monitor.expert_histograms=false",
    ]
    cmd = [sys.executable, str(REPO / "tools" / "train.py"), "-c", str(args.config), "--threads", str(threads)]
    for o in common + overrides + args.override:
        cmd += ["-o", o]
    if (out / "checkpoints").exists():  # a fresh run each time
        import shutil

        shutil.rmtree(out)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["loss"] for r in rows if r.get("kind") == "val"}
    train = [r for r in rows if r.get("kind") == "train"]
    return {
        "overrides": overrides,
        "val_steps": sorted(val),
        "val_loss": [val[s] for s in sorted(val)],
        "train_lm_loss": [r["lm_loss"] for r in train],
        "train_steps": [r["step"] for r in train],
        "tokens_per_s": [r["tokens_per_s"] for r in train[1:]] or [float("nan")],
        "unigram_baseline": next((r.get("unigram_baseline") for r in rows if r.get("kind") == "val"), None),
        "wall_s": wall,
    }


def step_reaching(steps: list[int], losses: list[float], target: float) -> float | None:
    """First (interpolated) step at which the curve reaches ``target``; None if never."""
    prev_s, prev_l = None, None
    for s, l in zip(steps, losses):
        if l <= target:
            if prev_s is None or prev_l == l:
                return float(s)
            return prev_s + (prev_l - target) / (prev_l - l) * (s - prev_s)
        prev_s, prev_l = s, l
    return None


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, r in results.items():
        ax.plot(r["val_steps"], r["val_loss"], marker="o", markersize=3, label=name)
    dense_final = results["dense"]["val_loss"][-1]
    ax.axhline(dense_final, color="gray", linestyle="--", linewidth=0.8, label=f"dense final {dense_final:.3f}")
    ax.set_xlabel("optimizer step (same tokens for every variant)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", type=Path, default=REPO / "configs" / "gpt_moe_small_bpe.yaml", help="base config")
    p.add_argument("--dataset", type=Path, default=REPO / "outputs" / "data" / "python_docs_bpe4k")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary when the dataset must be prepared")
    p.add_argument("--d_ff", type=int, default=512, help="F: the dense FFN width (top-2 experts are F/2)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--steps", type=int, default=400, help="size it from a smoke run's tokens/s: 3 runs share the budget")
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--only", default="dense,moe_top1,moe_top2", help="comma-separated variants")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="extra overrides for every variant")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_quality")
    p.add_argument("--json", type=Path, default=None, help="default: <out>/quality.json")
    args = p.parse_args(argv)
    if "dense" not in args.only.split(","):
        p.error("--only must include dense (the reference)")
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_dataset(args.dataset, args.vocab)
    vocab = json.loads((args.dataset / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    chosen = {k: v for k, v in variants(args.d_ff, args.experts).items() if k in args.only.split(",")}
    results = {}
    for name, overrides in chosen.items():
        print(f"== {name}: {' '.join(overrides)}", flush=True)
        results[name] = run_variant(name, overrides, args, vocab)
        print(f"   final held-out loss {results[name]['val_loss'][-1]:.4f} in {results[name]['wall_s']:.0f} s", flush=True)
    dense_final = results["dense"]["val_loss"][-1]
    for name, r in results.items():
        r["final_val_loss"] = r["val_loss"][-1]
        r["step_reaching_dense_final"] = step_reaching(r["val_steps"], r["val_loss"], dense_final)
    png = args.out / "quality.png"
    plot(results, png, f"{args.config.name}: dense F={args.d_ff} vs {args.experts} experts (top-1 F, top-2 F/2), "
                       f"BPE {vocab}, {args.steps} steps")
    print(f"\n{'variant':<10} {'final val loss':>15} {'reaches dense final at step':>28} {'tokens/s':>9} {'wall s':>7}")
    for name, r in results.items():
        reach = r["step_reaching_dense_final"]
        tps = sorted(r["tokens_per_s"])[len(r["tokens_per_s"]) // 2]
        print(f"{name:<10} {r['final_val_loss']:15.4f} {('-' if reach is None else f'{reach:.0f}'):>28} {tps:9.0f} {r['wall_s']:7.0f}")
    out_json = args.json or args.out / "quality.json"
    out_json.write_text(json.dumps({"config": str(args.config), "dataset": str(args.dataset), "vocab_size": vocab,
                                    "d_ff": args.d_ff, "experts": args.experts, "steps": args.steps,
                                    "dense_final_val_loss": dense_final, "results": results, "png": str(png)}, indent=2))
    print(f"curves: {png}\njson: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
