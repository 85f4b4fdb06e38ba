#!/usr/bin/env python
"""Compress a trained GPT-MoE's experts for deployment and report the quality/size trade-off.

    python tools/compress.py --checkpoint outputs/quickstart/checkpoints --keep 8,4,2,1 --steps 100 \
        --json outputs/compress.json [--out-dir outputs/compressed]

For each expert count: merge experts by routing statistics (held-out data), measure the
held-out loss, distil briefly against the full model, measure again; optionally export each
compressed model as an inference package.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--keep", default="8,4,2,1", help="expert counts to produce (larger than E are skipped)")
    p.add_argument("--steps", type=int, default=100, help="distillation steps per point")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out-dir", type=Path, default=None, help="export each compressed model as a package here")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace earlier packages in --out-dir")
    args = p.parse_args(argv)
    if not args.checkpoint.exists():
        raise FileNotFoundError(errno.ENOENT, "checkpoint not found", str(args.checkpoint))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    import logging

    import paddle

    from paddle_semoe.config import load_config
    from paddle_semoe.data import TokenBatcher, load_split, val_batches
    from paddle_semoe.io.checkpoint import resolve_checkpoint
    from paddle_semoe.engine.config import TrainConfig
    from paddle_semoe.inference import compression as C
    from paddle_semoe.inference.export import export_package, model_from_checkpoint

    logging.basicConfig(level=logging.WARNING)
    ckpt = resolve_checkpoint(str(args.checkpoint), args.checkpoint)
    cfg = load_config(TrainConfig, ckpt / "config.yaml")
    teacher = model_from_checkpoint(ckpt)
    split = load_split(cfg.data.corpus, cfg.data.val_fraction)
    S = cfg.data.seq_len
    val = lambda: val_batches(split.val, args.batch, S, max_batches=args.val_batches)  # noqa: E731
    usage = C.routing_statistics(teacher, val())
    full_loss = C.held_out_loss(teacher, val())
    E = teacher.config.moe.num_experts
    rows = []
    for keep in [int(k) for k in args.keep.split(",") if int(k) <= E]:
        paddle.seed(0)
        student = C.compress_model(teacher, usage, keep)
        merged = C.held_out_loss(student, val())
        train = TokenBatcher(split.train, args.batch, S, seed=1234)
        kl = C.distil(student, teacher, train, args.steps if keep < E else 0, args.lr) if keep < E else []
        distilled = C.held_out_loss(student, val())
        point = {
            "experts": keep, "expert_bytes": C.expert_bytes(student.config), "val_loss_merged": merged,
            "val_loss_distilled": distilled, "distil_steps": len(kl), "final_kl": kl[-1] if kl else 0.0,
        }
        rows.append(point)
        print(f"E={keep:3d}: experts {point['expert_bytes'] / 2**20:7.2f} MiB  val loss merged {merged:.4f} "
              f"-> distilled {distilled:.4f}  (full {full_loss:.4f})", flush=True)
        if args.out_dir:
            export_package(student, args.out_dir / f"experts_{keep}", graphs=False, overwrite=args.overwrite)
    report = {"checkpoint": str(ckpt), "full_val_loss": full_loss, "unigram_baseline": None, "points": rows}
    from paddle_semoe.data import unigram_cross_entropy_nats

    report["unigram_baseline"] = unigram_cross_entropy_nats(split.train, split.val, teacher.config.vocab_size)
    print(f"\n{'experts':>7} {'expert MiB':>10} {'size':>6} {'merged':>8} {'distilled':>9}  (full model {full_loss:.4f}, "
          f"unigram {report['unigram_baseline']:.3f} nats/token)")
    full_bytes = rows[0]["expert_bytes"] * E / rows[0]["experts"] if rows else 1
    for r in rows:
        print(f"{r['experts']:>7} {r['expert_bytes'] / 2**20:>10.2f} {100 * r['expert_bytes'] / full_bytes:>5.0f}% "
              f"{r['val_loss_merged']:>8.4f} {r['val_loss_distilled']:>9.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    from paddle_semoe.engine.launch_env import run_entry

    sys.exit(run_entry(lambda argv: 0 if main(argv) is not None else 1, name="compress"))
