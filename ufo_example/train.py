#!/usr/bin/env python
"""Train the UFO multi-task MoE with the elastic planner.

    bash ufo_example/setup.sh        # once: scikit-learn (the digits images ship inside it)
    python -m paddle.distributed.launch --nproc_per_node 4 ufo_example/train.py -c ufo_example/configs/ufo_tiny_cpu.yaml
    # restart from the last checkpoint when a worker dies (Paddle 3.3's --max_restart needs etcd):
    python -m paddle_semoe.elastic.launch --max_restart 1 --nproc_per_node 4 ufo_example/train.py -c ...
    # resize: stop, relaunch with another --nproc_per_node: it resumes, re-plans and reshards
    # plan only (no processes, costs from the config or FLOPs):
    python ufo_example/train.py -c ufo_example/configs/ufo_vit_gpu.yaml --dry_run --world_size 8
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True)
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dry_run", action="store_true", help="print the plan and per-rank parameter counts, exit")
    p.add_argument("--world_size", type=int, default=None, help="with --dry_run: plan for this many ranks")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: cores / local processes)")
    return p.parse_args(argv)


def dry_run(cfg, world: int) -> int:
    from paddle_semoe.elastic.planner import explain_plan, make_plan, plan_naive
    from paddle_semoe.elastic.trainer import config_costs, task_loads
    from paddle_semoe.models.ufo import TaskHead, UFOModel
    from ufo_example.data import DIGIT_TASK_KINDS

    source = cfg.elastic.cost_source
    note = source
    if source == "profile":
        source, note = "flops", f"flops at {cfg.elastic.assumed_flops_per_s:.3g} FLOP/s (a dry run cannot profile)"

    class _Flops:
        def flops_per_sample(self, task: int) -> float:
            return cfg.model.flops_per_sample(DIGIT_TASK_KINDS[cfg.tasks[task].kind])

    loads = task_loads(cfg.tasks, config_costs(cfg.tasks, _Flops(), source, cfg.elastic.assumed_flops_per_s))
    plan = make_plan(cfg.elastic.plan, loads, world)
    print(explain_plan(plan, plan_naive(loads, world), note))
    heads = [TaskHead(t.name, DIGIT_TASK_KINDS[t.kind]) for t in cfg.tasks]
    import paddle

    paddle.set_device("cpu")
    print("parameters per rank (built on CPU to count them):")
    for r in range(world):
        hosted = plan.rank_tasks(r)
        model = UFOModel(cfg.model, heads, hosted)
        n = sum(int(p.size) for p in model.parameters())
        # fp32 weights + AdamW moments (3 x 4 bytes) + grads (4 bytes)
        print(f"  rank {r}: tasks {[cfg.tasks[t].name for t in hosted]}: {n / 1e6:.2f} M params, ~{n * 16 / 2**30:.2f} GiB states")
        del model
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from paddle_semoe.engine.launch_env import launch_env, load_job_config, pin_threads, setup_logging

    env = launch_env()
    pin_threads(args.threads, env)
    setup_logging(env)
    rank, world = env.rank, env.world_size
    log = logging.getLogger("ufo.train")
    from paddle_semoe.config import dump_yaml, format_config
    from ufo_example.config import UFOJobConfig

    cfg, error = load_job_config(UFOJobConfig, args.config, args.override)
    if cfg is None:
        print(error, file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(cfg, args.world_size or world)

    import paddle

    from paddle_semoe import ops
    from paddle_semoe.elastic.trainer import ElasticTrainer, TrainingError
    from paddle_semoe.io.checkpoint import CheckpointError
    from ufo_example.workload import UFOWorkload

    if not paddle.is_compiled_with_cuda():
        paddle.set_device("cpu")
    # build/load the compiled ops before any collective (Gloo times out after 30 s)
    ops.resolve_backend(None if cfg.model.ops_backend == "auto" else cfg.model.ops_backend)
    if world > 1:
        import paddle.distributed as dist

        dist.init_parallel_env()
    if rank == 0:
        log.info("%s", format_config(cfg, title="resolved config"))
    try:
        trainer = ElasticTrainer(
            UFOWorkload(cfg), cfg.elastic, cfg.optim, cfg.train, cfg.monitor,
            write_config=lambda path: dump_yaml(cfg, path), world_size=world, rank=rank,
        )
        if rank == 0:
            dump_yaml(cfg, Path(cfg.train.output_dir) / "config.yaml")
        trainer.fit()
    except (TrainingError, CheckpointError, ValueError) as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from paddle_semoe.engine.launch_env import run_entry

    sys.exit(run_entry(main, name="ufo_example.train"))
