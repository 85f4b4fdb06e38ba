#!/usr/bin/env python
"""Training throughput of an exact PyTorch replica of the GPT-MoE model, for side-by-side
comparison with tools/bench_train.py (``--compare-torch`` drives this script).

    outputs/torch-venv/bin/python tools/bench_train_torch.py --spec spec.json --batches b.npy \
        --steps 40 --log-every 5 --threads 2 --json out.json

torch is NOT a dependency of paddle-semoe: run this with an interpreter that has torch (e.g.
``python3 -m venv outputs/torch-venv && outputs/torch-venv/bin/pip install torch numpy``). The
script imports nothing from paddle_semoe; bench_train.py writes the model spec (the resolved
config's model/optim fields) and the token batches (the project's own batcher) for it.

The replica: same shapes and parameter counts (printed, checked by the driver), pre-LN blocks,
learned positions, tied embedding head, fused qkv projection, causal attention through
``F.scaled_dot_product_attention``; MoE blocks as DeepSpeed-MoE builds them (linear router
without bias, top-k gating with GShard capacity (first choices before second choices), an
index-based dispatch/combine, a per-expert Linear-GELU-Linear loop), load-balance
loss ``E * sum f_e P_e`` and router z-loss with the config's coefficients; AdamW (decay on
matrices only), global-norm clipping, the same learning-rate schedule. Timing: per-interval
tokens/s over ``log_every`` steps, median after the first interval; plus median per-phase
step times (fwd, bwd, clip, opt) and process CPU time per step (``cpu``: robust to other
processes' load when run with one thread).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, help="JSON with the model/optim fields (written by bench_train.py)")
    p.add_argument("--batches", required=True, help=".npy int64 [steps, B, S+1] token batches")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import torch.nn as nn
    import torch.nn.functional as F

    spec = json.loads(open(args.spec).read())
    m, o = spec["model"], spec["optim"]
    V, S_max, D, L, H, Fd = m["vocab_size"], m["max_seq_len"], m["d_model"], m["n_layers"], m["n_heads"], m["d_ff"]
    moe_every, moe = m["moe_every"], m["moe"]
    E, K, cf = moe["num_experts"], moe["top_k"], moe["capacity_factor"]
    F_e = moe.get("d_ff") or Fd
    std = m["init_std"]
    torch.manual_seed(0)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(D, 3 * D)
            self.proj = nn.Linear(D, D)

        def forward(self, x):
            B, S, _ = x.shape
            q, k, v = self.qkv(x).view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(B, S, D))

    class Expert(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(D, f), nn.Linear(f, D)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class MoE(nn.Module):
        """DeepSpeed-MoE's layer with an index-based dispatch (Tutel-style gather/scatter instead
        of DeepSpeed's dense [T, E, C] einsums, which are ~5x slower here): the stronger baseline."""

        def __init__(self):
            super().__init__()
            self.wg = nn.Linear(D, E, bias=False)
            self.experts = nn.ModuleList([Expert(F_e) for _ in range(E)])

        def forward(self, x):
            shape = x.shape
            x = x.reshape(-1, D)
            T = x.shape[0]
            logits = self.wg(x)
            probs = F.softmax(logits, dim=-1)
            top_p, top_i = probs.topk(K, dim=-1)
            if moe.get("normalize_topk") is not False and K > 1:
                top_p = top_p / top_p.sum(-1, keepdim=True)
            C = math.ceil(cf * T * K / E)
            # GShard priority: every token's first choice before any token's second choice
            ids = top_i.t().reshape(-1)
            w = top_p.t().reshape(-1)
            tok = torch.arange(T).repeat(K)
            onehot = F.one_hot(ids, E)
            rank = (torch.cumsum(onehot, 0) - 1).gather(1, ids[:, None]).squeeze(1)
            keep = rank < C
            slot, tok, w = (ids * C + rank)[keep], tok[keep], w[keep]
            rows = x.new_zeros(E * C, D).index_put((slot,), x[tok]).view(E, C, D)
            out = torch.stack([ex(rows[e]) for e, ex in enumerate(self.experts)]).view(E * C, D)
            y = x.new_zeros(T, D).index_add(0, tok, out[slot] * w[:, None])
            f = onehot.sum(0).float() / (T * K)
            aux = E * (f * probs.mean(0)).sum()
            z = torch.logsumexp(logits, -1).pow(2).mean()
            return y.reshape(shape), moe["aux_loss_coef"] * aux + moe["z_loss_coef"] * z

    class DenseFFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(D, Fd), nn.Linear(Fd, D)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x))), None

    class Block(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.attn = Attention()
            self.ffn = MoE() if moe_every > 0 and (i + 1) % moe_every == 0 else DenseFFN()

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            y, aux = self.ffn(self.ln2(x))
            return x + y, aux

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(S_max, D)
            self.blocks = nn.ModuleList([Block(i) for i in range(L)])
            self.ln_f = nn.LayerNorm(D)
            for name, prm in self.named_parameters():
                if prm.dim() >= 2:
                    nn.init.normal_(prm, std=std)
                elif name.endswith("bias"):
                    nn.init.zeros_(prm)

        def forward(self, tokens, targets):
            S = tokens.shape[1]
            x = self.tok(tokens) + self.pos(torch.arange(S)).unsqueeze(0)
            aux = x.new_zeros(())
            for blk in self.blocks:
                x, a = blk(x)
                if a is not None:
                    aux = aux + a
            logits = self.ln_f(x) @ self.tok.weight.t()
            lm = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
            return lm + aux, lm

    model = GPT()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
    )

    def lr_at(step):
        if o["warmup_steps"] and step < o["warmup_steps"]:
            return o["lr"] * (step + 1) / o["warmup_steps"]
        span = max(args.steps - o["warmup_steps"], 1)
        prog = min(max(step - o["warmup_steps"], 0) / span, 1.0)
        floor = o["lr"] * o["min_lr_ratio"]
        return floor + (o["lr"] - floor) * 0.5 * (1.0 + math.cos(math.pi * prog))

    batches = np.load(args.batches)
    tokens_per_step = batches.shape[1] * (batches.shape[2] - 1)
    phases = {k: [] for k in ("fwd", "bwd", "clip", "opt", "step", "cpu")}
    intervals, losses = [], []
    t_int = time.perf_counter()
    for step in range(args.steps):
        b = torch.from_numpy(batches[step % len(batches)])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        c0 = time.process_time()
        t0 = time.perf_counter()
        loss, lm = model(b[:, :-1], b[:, 1:])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if o["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, time.process_time() - c0)):
            phases[k].append(v * 1e3)
        if (step + 1) % args.log_every == 0:
            lm_v = float(lm.detach())  # the log step's host sync, as the project's trainer does
            losses.append(lm_v)
            now = time.perf_counter()
            intervals.append(tokens_per_step * args.log_every / (now - t_int))
            t_int = now
    skip = max(1, len(phases["step"]) // 5)
    report = {
        "params": n_params,
        "tokens_per_s": statistics.median(intervals[1:] or intervals),
        "intervals": intervals,
        "final_loss": losses[-1] if losses else float("nan"),
        "phase_ms": {k: statistics.median(v[skip:]) for k, v in phases.items()},
        "torch": torch.__version__,
        "threads": args.threads,
    }
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
