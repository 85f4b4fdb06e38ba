#!/usr/bin/env python
"""Capacity planner of hierarchical expert storage (SE-MoE's per-machine formulas).

    python tools/plan.py configs/clusters/ufo_12b_6x8_a100.yaml
    python tools/plan.py configs/clusters/gpt_moe_104b_8x8_a100.yaml --alpha 0.5
    python tools/plan.py configs/clusters/cpu_this_machine.yaml --json plan.json
    python tools/plan.py configs/clusters/cpu_this_machine.yaml --train-config configs/gpt_moe_tiny.yaml -o model.moe.num_experts=16

A cluster description is a YAML file with ``name``, ``machines``, ``machine: {devices,
device_memory_gb (per device), host_memory_gb, ssd_gb}`` and ``model: {name, dense_params,
sparse_params, moe_layers, alpha}`` (or ``model: {train_config: <training yaml>, alpha}``).
Prints which tier holds what, the bytes per tier and machine, and what does not fit; for a
model given by a training config it also prints this implementation's ``storage`` sizes.
Exit status 0 when everything fits, 1 when a tier does not, 2 on a bad description.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cluster", help="cluster description YAML (configs/clusters/*.yaml)")
    p.add_argument("--alpha", type=float, default=None, help="override the activated fraction of the expert parameters")
    p.add_argument("--train-config", default=None, help="take the model from this training config instead")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="override a key of --train-config")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from paddle_semoe.config.yaml_files import load_yaml_with_bases
    from paddle_semoe.storage.capacity import (
        cluster_from_dict,
        cpu_knobs,
        format_plan,
        model_from_dict,
        plan,
    )
    from paddle_semoe.engine.plan import model_spec_from_train_config

    path = Path(args.cluster)
    try:
        raw = load_yaml_with_bases(path)
        cluster = cluster_from_dict(raw, where=path.name)
        train_cfg = None
        if args.train_config:
            model = model_spec_from_train_config(Path(args.train_config), alpha=args.alpha, overrides=args.override)
            train_cfg = Path(args.train_config)
        else:
            if "model" not in raw:
                raise ValueError(f"{path.name}: no 'model' section (or pass --train-config)")
            model = model_from_dict(raw["model"], path.parent, f"{path.name}.model", model_spec_from_train_config)
            if "train_config" in raw["model"]:
                train_cfg = (path.parent / raw["model"]["train_config"]).resolve()
        if args.alpha is not None:
            model = replace(model, alpha=args.alpha)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    p = plan(model, cluster)
    print(format_plan(p))
    out = {"fits": p.fits, "model": asdict(model), "cluster": cluster.name, "machines": cluster.machines,
           "tiers": [{**asdict(t), "fits": t.fits} for t in p.tiers],
           "resident_bytes_per_machine": p.resident_bytes_per_machine,
           "max_alpha_host": p.max_alpha_host, "max_alpha_device": p.max_alpha_device}
    if train_cfg is not None:
        from paddle_semoe.config import load_config
        from paddle_semoe.engine.config import TrainConfig

        cfg = load_config(TrainConfig, train_cfg, args.override if args.train_config else [])
        ranks = cfg.parallel.ep_degree
        k = cpu_knobs(model, ranks)
        print(
            f"\nthis implementation, per rank ({ranks} expert-parallel rank(s), alpha={model.alpha:g}):\n"
            f"  storage.working_set_mb >= {k.working_set_mb:,.0f}  (4 B x alpha x local experts: every MoE layer of a "
            f"micro-batch stays in the working set until its backward)\n"
            f"  storage.host_cache_mb  >= {k.host_cache_mb:,.0f}  (12 B x alpha x local experts: the activated states, "
            f"so no state is read twice in a step)\n"
            f"  SSD tier: {k.ssd_mb:,.0f} MiB; resident instead: {k.resident_mb:,.0f} MiB of expert weights+grads+moments"
        )
        out["cpu_knobs_per_rank"] = asdict(k)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if p.fits else 1


if __name__ == "__main__":
    from paddle_semoe.engine.launch_env import run_entry

    sys.exit(run_entry(main, name="plan"))
