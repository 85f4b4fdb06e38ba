"""Expert compression for deployment: fewer experts per MoE layer, then a short distillation.

1. **Routing statistics** on held-out data: how many routing choices each expert receives.
2. **Merge**: per MoE layer keep the ``keep`` most-used experts; every other expert is folded
   into the kept expert whose weights are most similar (cosine over its flattened w1/w2), as
   a usage-weighted average of the weights. The router keeps the kept experts' columns.
3. **Distil**: train the compressed student for a few steps to match the full teacher's
   next-token distribution (KL divergence on the logits) on training text.

The report pairs each expert count with its expert bytes and held-out loss, before and after
distillation, so the quality/size trade-off is explicit.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import paddle
import paddle.nn.functional as F

from paddle_semoe.inference.export import dense_arrays
from paddle_semoe.models.gpt import GPTConfig, GPTMoE

logger = logging.getLogger(__name__)


@paddle.no_grad()
def routing_statistics(model: GPTMoE, batches) -> dict[int, np.ndarray]:
    """block index -> int64 [E] routing choices per expert (before capacity) over ``batches``."""
    model.eval()
    moe_blocks = [i for i, b in enumerate(model.blocks) if b.is_moe]
    usage = {i: np.zeros(model.config.moe.num_experts, np.int64) for i in moe_blocks}
    for batch in batches:
        out = model(paddle.to_tensor(batch[:, :-1]))
        for i, s in zip(moe_blocks, out.moe_stats):
            usage[i] += s.demand.numpy().astype(np.int64)
    return usage


def merge_plan(w: np.ndarray, usage: np.ndarray, keep: int) -> list[list[int]]:
    """Groups of experts: group g is [kept expert, experts merged into it...].

    ``w``: [E, P] flattened expert weights; ``usage``: [E] routing counts. The ``keep`` most
    used experts are kept (ties: lower index); each other expert joins the kept expert with
    the highest cosine similarity.
    """
    E = w.shape[0]
    if not 1 <= keep <= E:
        raise ValueError(f"keep must be in [1, {E}], got {keep}")
    order = sorted(range(E), key=lambda e: (-int(usage[e]), e))
    kept = sorted(order[:keep])
    unit = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    groups = {k: [k] for k in kept}
    for e in order[keep:]:
        target = max(kept, key=lambda k: (float(unit[e] @ unit[k]), -k))
        groups[target].append(e)
    return [groups[k] for k in kept]


def compress_model(model: GPTMoE, usage: dict[int, np.ndarray], keep: int) -> GPTMoE:
    """A new model with ``keep`` experts per MoE layer (dense weights copied)."""
    cfg = model.config
    k_new = min(cfg.moe_config().k, keep)
    new_cfg = replace(cfg, moe=replace(cfg.moe, num_experts=keep, top_k=min(cfg.moe.top_k, keep),
                                       gate=cfg.moe.gate if k_new == cfg.moe_config().k else "topk"))
    student = GPTMoE(new_cfg)
    dense = dense_arrays(model)
    for name, p in student.named_parameters():
        if ".experts." in name or name.endswith("router.weight"):
            continue
        p.set_value(dense[name])
    for i, (tb, sb) in enumerate(zip(model.blocks, student.blocks)):
        if not tb.is_moe:
            continue
        ex = tb.ffn.experts
        w1, b1, w2, b2 = (getattr(ex, n).numpy() for n in ("w1", "b1", "w2", "b2"))
        flat = np.concatenate([w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)], axis=1)
        groups = merge_plan(flat, usage[i], keep)
        weight = np.maximum(usage[i].astype(np.float64), 1.0)
        def avg(a, g):
            c = weight[g] / weight[g].sum()
            return np.tensordot(c, a[g], axes=1).astype(np.float32)
        for name, arr in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
            getattr(sb.ffn.experts, name).set_value(np.stack([avg(arr, g) for g in groups]))
        router = tb.ffn.router.weight.numpy()
        sb.ffn.router.weight.set_value(router[:, [g[0] for g in groups]])
        logger.info("layer %d: kept experts %s (merged groups %s)", i, [g[0] for g in groups], groups)
    return student


def distil(student: GPTMoE, teacher: GPTMoE, batches, steps: int, lr: float = 1e-3) -> list[float]:
    """Train ``student`` to match ``teacher``'s next-token distribution; returns the KL per step."""
    teacher.eval()
    student.train()
    opt = paddle.optimizer.AdamW(learning_rate=lr, parameters=student.parameters(), weight_decay=0.0)
    losses = []
    for _, batch in zip(range(steps), batches):
        x = paddle.to_tensor(batch[:, :-1])
        with paddle.no_grad():
            t_logp = F.log_softmax(teacher(x).logits, axis=-1)
        out = student(x)
        s_logp = F.log_softmax(out.logits, axis=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(axis=-1).mean()
        loss = kl + out.aux_loss
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(kl))
    student.eval()
    return losses


@paddle.no_grad()
def held_out_loss(model: GPTMoE, batches) -> float:
    model.eval()
    total = count = 0.0
    for batch in batches:
        out = model(paddle.to_tensor(batch[:, :-1]), paddle.to_tensor(batch[:, 1:]))
        n = batch[:, 1:].size
        total += float(out.lm_loss) * n
        count += n
    return total / max(count, 1.0)


def expert_bytes(cfg: GPTConfig) -> int:
    E, D = cfg.moe.num_experts, cfg.d_model
    Fe = cfg.moe.d_ff or cfg.d_ff
    return len(cfg.moe_layers) * E * (2 * D * Fe + Fe + D) * 4
