#!/usr/bin/env python
"""Train the same GPT-MoE on the same data and steps with each router; compare them.

    python tools/bench_routing.py -c configs/gpt_moe_tiny.yaml --steps 200 --threads 2 \
        --out outputs/bench_routing

One process, every expert local (routing does not depend on the expert-parallel degree).
Every router starts from the same seed, sees the same batches (a fixed NumPy stream of
windows of the training bytes), trains with the config's AdamW and LR schedule (warmup, then
the schedule over ``--steps``) and is evaluated on the same held-out windows. Per router:

  held-out loss   mean token cross-entropy on the validation windows after the last step
  load max/mean   over the MoE layers and the last quarter of the steps: the busiest expert's
                  demand (choices before capacity) over the mean demand (1.0 = balanced)
  dropped         share of the T*k choices not computed (capacity), and per choice rank
  expert-less     share of the tokens none of whose choices was computed
  tokens/s        training tokens per second (forward + backward + optimizer)

Writes ``<out>/bench_routing.json`` (every number and the per-step curves), a PNG of the
training-loss and load curves (matplotlib) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paddle_semoe.bench.timing import set_threads  # noqa: E402  (no paddle import yet)

# name -> model.moe overrides (on top of the config's own MoE settings)
ROUTERS: dict[str, dict] = {
    "top2 token-major (old)": dict(capacity_order="token"),
    "top2 choice-major": dict(),
    "top2 probs": dict(drop_policy="probs"),
    "top2 BPR": dict(batch_priority=True),
    "fine-grained 4x + shared": dict(fine_grained=4),
    # DeepSeek-V3 uses rate 1e-3 over ~10^5 steps; a bench of a few hundred steps needs a faster one
    "aux-free (sigmoid)": dict(router="aux_free", score_fn="sigmoid", aux_loss_coef=0.0, bias_update_rate=1e-2),
    "device-limited M=1/4": dict(router="device_limited", device_groups=4, device_limit=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", type=Path, default=Path("configs/gpt_moe_tiny.yaml"))
    p.add_argument("-o", "--override", action="append", default=[], help="a.b=c config override (repeatable)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=0, help="sequences per step (0: data.global_batch_size)")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--routers", default=",".join(ROUTERS), help="comma-separated names (see ROUTERS)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/bench_routing"))
    return p.parse_args(argv)


@dataclass
class RouterRun:
    name: str
    moe: dict
    losses: list[float] = field(default_factory=list)
    load_ratio: list[float] = field(default_factory=list)  # per step, mean over layers
    dropped: list[float] = field(default_factory=list)
    dropped_by_choice: list[list[float]] = field(default_factory=list)
    expertless: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    val_loss: float = float("nan")
    bias_abs_mean: float = 0.0

    def summary(self) -> dict:
        tail = max(len(self.losses) // 4, 1)

        def mean_tail(v):
            return float(sum(v[-tail:]) / len(v[-tail:])) if v else float("nan")

        by_choice = [mean_tail([row[j] for row in self.dropped_by_choice]) for j in range(len(self.dropped_by_choice[0]))]
        return {
            "router": self.name,
            "moe_overrides": self.moe,
            "val_loss": self.val_loss,
            "train_loss_last": mean_tail(self.losses),
            "load_max_over_mean": mean_tail(self.load_ratio),
            "dropped_fraction": mean_tail(self.dropped),
            "dropped_by_choice": by_choice,
            "expertless_fraction": mean_tail(self.expertless),
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            "balance_bias_abs_mean": self.bias_abs_mean,
        }


def moe_settings(base, overrides: dict):
    """The config's MoE settings with a router's overrides. ``fine_grained=f``: f times the
    experts at 1/f of the width, k*f - f of them routed per token plus one shared expert of the
    original width, so a token's active FFN width stays k * d_ff (DeepSeekMoE's layout)."""
    kw = dict(overrides)
    f = kw.pop("fine_grained", 0)
    if f:
        # same active FFN width per token: k*F = (k*f - f) * (F/f) routed + one shared of width F
        d_ff = base.d_ff
        kw.update(num_experts=base.num_experts * f, top_k=base.k * f - f, d_ff=d_ff // f if d_ff else None,
                  num_shared_experts=1, shared_d_ff=d_ff)
    return replace(base, **kw)


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    import logging

    import numpy as np
    import paddle

    from paddle_semoe.data.corpus import load_split
    from paddle_semoe.engine.config import TrainConfig
    from paddle_semoe.engine.launch_env import load_job_config
    from paddle_semoe.engine.optim import lr_at
    from paddle_semoe.models.gpt import GPTMoE
    from paddle_semoe.moe import update_balance_biases
    from paddle_semoe.moe.routers import AuxFreeRouter

    logging.basicConfig(level=logging.WARNING)
    cfg, error = load_job_config(TrainConfig, args.config, ["parallel.ep_degree=1", *args.override])
    if error:
        print(error, file=sys.stderr)
        return {}
    names = [n.strip() for n in args.routers.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROUTERS]
    if unknown:
        print(f"error: unknown router(s) {unknown}; choose from {list(ROUTERS)}", file=sys.stderr)
        return {}
    mcfg = cfg.model
    if mcfg.moe.d_ff is None:
        mcfg = replace(mcfg, moe=replace(mcfg.moe, d_ff=mcfg.d_ff))
    split = load_split(cfg.data.corpus)
    S = cfg.data.seq_len
    B = args.batch or cfg.data.global_batch_size
    rng = np.random.default_rng(args.seed)
    train = np.asarray(split.train)
    val = np.asarray(split.val)
    starts = rng.integers(0, len(train) - S - 1, size=(args.steps, B))
    vstarts = np.linspace(0, len(val) - S - 2, args.eval_windows).astype(np.int64)
    vbatch = np.stack([val[s : s + S + 1] for s in vstarts]).astype(np.int64)

    runs = []
    for name in names:
        run = RouterRun(name, ROUTERS[name])
        model_cfg = replace(mcfg, moe=moe_settings(mcfg.moe, ROUTERS[name]))
        paddle.seed(cfg.train.seed)
        model = GPTMoE(model_cfg)
        o = cfg.optim
        opt = paddle.optimizer.AdamW(o.lr, beta1=o.beta1, beta2=o.beta2, epsilon=o.eps, parameters=model.parameters(),
                                     weight_decay=o.weight_decay,
                                     grad_clip=paddle.nn.ClipGradByGlobalNorm(o.grad_clip) if o.grad_clip > 0 else None)
        model.train()
        for step in range(args.steps):
            batch = np.stack([train[s : s + S + 1] for s in starts[step]]).astype(np.int64)
            x, y = paddle.to_tensor(batch[:, :-1]), paddle.to_tensor(batch[:, 1:])
            t0 = time.perf_counter()
            opt.set_lr(lr_at(step, o, args.steps))  # the trainer's schedule, over --steps
            out = model(x, y)
            out.loss.backward()
            opt.step()
            opt.clear_grad()
            update_balance_biases(model)
            loss = float(out.lm_loss)
            run.seconds += time.perf_counter() - t0
            run.tokens += B * S
            run.losses.append(loss)
            ratios, dropped, by_choice, expertless = [], [], [], []
            for s in out.moe_stats:
                demand = s.demand.numpy().astype(np.float64)
                ratios.append(demand.max() / max(demand.mean(), 1e-9))
                dropped.append(float(s.dropped_fraction))
                by_choice.append(s.dropped_by_choice.numpy())
                expertless.append(float(s.expertless_fraction))
            run.load_ratio.append(float(np.mean(ratios)))
            run.dropped.append(float(np.mean(dropped)))
            run.dropped_by_choice.append(np.mean(by_choice, axis=0).tolist())
            run.expertless.append(float(np.mean(expertless)))
        model.eval()
        with paddle.no_grad():
            run.val_loss = float(model(paddle.to_tensor(vbatch[:, :-1]), paddle.to_tensor(vbatch[:, 1:])).lm_loss)
        biases = [layer.balance_bias.numpy() for layer in model.sublayers() if isinstance(layer, AuxFreeRouter)]
        run.bias_abs_mean = float(np.mean([np.abs(b).mean() for b in biases])) if biases else 0.0
        runs.append(run)
        sm = run.summary()
        print(f"  {name}: val {sm['val_loss']:.4f}, load max/mean {sm['load_max_over_mean']:.2f}, "
              f"{sm['tokens_per_s']:.0f} tok/s", flush=True)

    report = {
        "config": str(args.config),
        "overrides": args.override,
        "steps": args.steps,
        "batch": [B, S],
        "threads": args.threads,
        "results": [r.summary() for r in runs],
        "curves": {r.name: {"loss": r.losses, "load_max_over_mean": r.load_ratio, "dropped": r.dropped,
                            "expertless": r.expertless} for r in runs},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_routing.json").write_text(json.dumps(report, indent=1) + "\n")
    png = _plot(runs, args.out / "bench_routing.png")
    _print_table(report["results"])
    print(f"wrote {args.out / 'bench_routing.json'}" + (f" and {png}" if png else " (no matplotlib: no PNG)"))
    return report


def _smooth(v: list[float], w: int = 10) -> list[float]:
    out, acc = [], []
    for x in v:
        acc.append(x)
        acc = acc[-w:]
        out.append(sum(acc) / len(acc))
    return out


def _plot(runs: list[RouterRun], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        a.plot(_smooth(r.losses), label=r.name)
        b.plot(_smooth(r.load_ratio), label=r.name)
    a.set(xlabel="step", ylabel="training loss (nats, 10-step mean)", title="loss")
    b.set(xlabel="step", ylabel="max / mean expert demand (10-step mean)", title="load")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _print_table(results: list[dict]) -> None:
    head = f"{'router':28s} {'val loss':>9s} {'load max/mean':>14s} {'dropped':>8s} {'1st/2nd+ dropped':>18s} {'expert-less':>12s} {'tok/s':>8s}"
    print(head)
    print("-" * len(head))
    for r in results:
        bc = r["dropped_by_choice"]
        later = sum(bc[1:]) / max(len(bc) - 1, 1) if len(bc) > 1 else 0.0
        print(f"{r['router']:28s} {r['val_loss']:9.4f} {r['load_max_over_mean']:14.2f} {r['dropped_fraction']:8.3f} "
              f"{bc[0]:8.3f}/{later:<9.3f} {r['expertless_fraction']:12.3f} {r['tokens_per_s']:8.0f}")


if __name__ == "__main__":
    main()
