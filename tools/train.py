#!/usr/bin/env python
"""Train a GPT-MoE model.

    python -m paddle.distributed.launch --nproc_per_node 2 tools/train.py -c configs/gpt_moe_tiny.yaml
    python tools/train.py -c configs/gpu/gpt_1p3b_e64.yaml --dry_run        # plan for the smallest valid world
    python tools/train.py -c configs/gpu/gpt_1p3b_e64.yaml --dry_run --world_size 64
    ... -o train.max_steps=500 -o parallel.ep_degree=2 -o train.resume=auto

Several machines: run the same command on each with
``--nnodes M --master <ip:port>`` added to ``paddle.distributed.launch``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True, help="YAML config (supports _base_)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--dry_run", action="store_true", help="build the model lazily, print the plan and parameter counts, exit")
    p.add_argument("--world_size", type=int, default=None,
                   help="with --dry_run: plan for this many ranks (default: the launched world, else the smallest "
                        "world the config allows)")
    p.add_argument("--eval_only", action="store_true", help="load train.resume, print the held-out loss as JSON, exit")
    p.add_argument("--eval_text", action="append", default=[], metavar="FILE",
                   help="with --eval_only: also score these UTF-8 text files, encoded with the checkpoint's tokenizer "
                        "(loss in nats/token and bits/byte)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: cores / local processes)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from paddle_semoe.engine.launch_env import keep_freed_memory, launch_env, load_job_config, pin_threads, setup_logging

    env = launch_env()
    pin_threads(args.threads, env)
    keep_freed_memory()
    setup_logging(env)
    log = logging.getLogger("train")

    from paddle_semoe.config import format_config
    from paddle_semoe.engine.config import TrainConfig

    cfg, error = load_job_config(TrainConfig, args.config, args.override)
    if cfg is None:
        print(error, file=sys.stderr)
        return 2

    if args.dry_run:
        from paddle_semoe.engine.plan import format_plan
        from paddle_semoe.engine.distributed import launched_world_size

        launched = launched_world_size()
        if args.world_size is not None:
            world, why = args.world_size, "--world_size"
        elif launched > 1:
            world, why = launched, "the launched world"
        else:
            world = cfg.parallel.smallest_world_size()
            why = "the smallest world the config allows; pass --world_size N to plan for another"
        try:
            print(format_config(cfg, title="resolved config"))
            print(f"planning for world_size={world} ({why})")
            print(format_plan(cfg, world))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0

    from paddle_semoe import ops
    from paddle_semoe.engine.run_lock import lock_output_dir

    # Build/load the compiled ops before any collective: a first-time build (~20 s) inside a
    # Gloo wait would run into Gloo's fixed 30 s timeout on the other ranks.
    ops.resolve_backend(cfg.model.ops_backend)
    # one run per output directory (each rank holds its lock until it exits); evaluation only reads
    run_lock = None if args.eval_only else lock_output_dir(cfg.train.output_dir, env.rank)
    try:
        return _run(args, cfg, log, run_lock is not None)
    finally:
        if run_lock is not None:
            run_lock.release()


def _run(args: argparse.Namespace, cfg, log: logging.Logger, train: bool) -> int:
    from paddle_semoe.config import format_config
    from paddle_semoe.engine.distributed import init_distributed
    from paddle_semoe.engine.launch_env import EXIT_PREEMPTED
    from paddle_semoe.engine.preempt import Preempted, StopRequest
    from paddle_semoe.engine.trainer import Trainer, TrainingError
    from paddle_semoe.io.checkpoint import CheckpointError

    try:
        ctx = init_distributed(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if ctx.is_main:
        log.info("%s", format_config(cfg, title="resolved config"))
    try:
        trainer = Trainer(cfg, ctx)
        if args.eval_only:
            if not trainer.resume(cfg.train.resume):
                raise CheckpointError("--eval_only needs -o train.resume=<checkpoint or auto> pointing at a checkpoint")
            result = {"step": trainer.step, "val_loss": trainer.evaluate(), "world_size": ctx.world_size,
                      "ep_degree": ctx.parallel.ep_degree}
            if args.eval_text:
                result["text"] = _score_text(trainer, args.eval_text)
            if ctx.is_main:
                print(json.dumps(result), flush=True)
            return 0
        if train:  # SIGTERM/SIGINT: finish the step on every rank, save, exit EXIT_PREEMPTED
            trainer.stop_request = StopRequest().install()
        trainer.fit()
    except Preempted as stop:
        log.warning("%s", stop)
        print(f"preempted: {stop}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except (TrainingError, CheckpointError, ValueError) as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _score_text(trainer, paths: list[str]) -> dict:
    """Loss of the resumed model on text files, encoded with the tokenizer its checkpoint carries."""
    import math

    from paddle_semoe.data import encode_text_files, model_tokenizer

    cfg = trainer.cfg
    tok = model_tokenizer(trainer.resumed_from, cfg.model.vocab_size)
    ids, n_bytes = encode_text_files(tok, [Path(p) for p in paths])
    need = cfg.data.seq_len * trainer.ctx.world_size * max(cfg.data.global_batch_size // trainer.ctx.world_size, 1) + 1
    if trainer.ctx.world_size == 1:
        need = cfg.data.seq_len + 1
    if ids.size < need:
        raise ValueError(f"--eval_text: {', '.join(paths)} encode to {ids.size} tokens with {tok.describe()}; "
                         f"scoring needs at least {need} (data.seq_len={cfg.data.seq_len}, on {trainer.ctx.world_size} rank(s))")
    loss = trainer.evaluate(ids)
    return {"files": paths, "tokenizer": tok.describe(), "tokens": int(ids.size), "bytes": n_bytes, "loss": loss,
            "bits_per_byte": loss / math.log(2) * ids.size / n_bytes}


if __name__ == "__main__":
    from paddle_semoe.engine.launch_env import run_entry

    sys.exit(run_entry(main, name="train"))
