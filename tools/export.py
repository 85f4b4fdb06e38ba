#!/usr/bin/env python
"""Turn a training checkpoint (or a freshly built model) into an inference package.

    python tools/export.py --checkpoint outputs/quickstart/checkpoints/step_00000300 --out outputs/pkg_tiny
    python tools/export.py -c configs/gpt_moe_tiny.yaml --fresh --out outputs/pkg_fresh   # random weights

The package holds the dense weights, one O_DIRECT-readable section file per MoE layer with
that layer's experts, Paddle static sub-graphs for Paddle Inference, and a manifest with the
SHA-256 of every file (see paddle_semoe/inference/package.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a checkpoint directory (step_XXXXXXXX) or a run's checkpoints/ dir")
    src.add_argument("--fresh", action="store_true", help="export a freshly initialized model of -c's config")
    p.add_argument("-c", "--config", type=Path, help="training config (with --fresh)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True,
                   help="a new or empty directory, or an earlier package (replaced only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier inference package in --out")
    p.add_argument("--no-graphs", action="store_true", help="skip the static graphs (dygraph serving only)")
    p.add_argument("--int8", action="store_true", help="also write weight-only int8 expert sections (serve --quant int8)")
    p.add_argument("--int4", action="store_true",
                   help="also write weight-only int4 expert sections, a scale per 32 inputs (serve --quant int4)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)

    import paddle

    from paddle_semoe.config import ConfigError, load_config
    from paddle_semoe.io.checkpoint import CheckpointError, resolve_checkpoint
    from paddle_semoe.engine.config import TrainConfig
    from paddle_semoe.inference.export import (
        check_export_target, checkpoint_tokenizer_files, export_package, model_from_checkpoint,
    )
    from paddle_semoe.models.gpt import GPTMoE

    try:
        check_export_target(args.out, args.overwrite)  # refuse before any work
        extra = []
        if args.fresh:
            if args.config is None:
                p.error("--fresh needs -c CONFIG")
            cfg = load_config(TrainConfig, args.config, args.override)
            paddle.seed(args.seed)
            model = GPTMoE(cfg.model)
        else:
            ckpt = resolve_checkpoint(str(args.checkpoint), args.checkpoint)
            model = model_from_checkpoint(ckpt)
            extra = checkpoint_tokenizer_files(ckpt)  # the training tokenizer travels into the package
        export_package(model, args.out, graphs=not args.no_graphs, extra_files=extra, int8=args.int8,
                       int4=args.int4, overwrite=args.overwrite)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported: {args.out}")
    return 0


if __name__ == "__main__":
    from paddle_semoe.engine.launch_env import run_entry

    sys.exit(run_entry(main, name="export"))
