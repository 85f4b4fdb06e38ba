"""Checkpoint (or a freshly built model) -> inference package (see package.py).

The dense part is also exported as Paddle static sub-graphs (``paddle.jit.save``) for Paddle
Inference, cut at the expert boundary so a ring can supply expert weights between them:

==============  ======================================================  ==================
graph           inputs -> outputs                                       parameters
==============  ======================================================  ==================
``embed``       tokens [B,S] int64 -> x [B,S,D]                         embeddings
``block_i``     x -> x (a dense block: attention + dense FFN)           block i
``moe_pre_i``   x -> x_mid, rows, counts, weights, positions            attention, router
                (attention, then dropless fused gate-dispatch)
``experts``     rows, counts, w1, b1, w2, b2 -> rows (grouped FFN)      none (weights are inputs)
``moe_post``    x_mid, rows, weights, positions -> x (combine + add)    none
``head``        x -> logits [B,S,V]                                     final norm, table
==============  ======================================================  ==================

The custom ops appear in ``moe_pre``/``experts``/``moe_post`` and survive export through their
InferShape/InferDtype functions.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
from paddle.static import InputSpec

from paddle_semoe import ops
from paddle_semoe.config import load_config, to_dict
from paddle_semoe.engine.checkpoint import read_manifest as read_checkpoint
from paddle_semoe.engine.config import TrainConfig
from paddle_semoe.engine.state import ExpertLayout, restore_rank_state
from paddle_semoe.inference.package import EXPERT_TENSORS, Section, write_manifest, write_section
from paddle_semoe.models.gpt import GPTConfig, GPTMoE
from paddle_semoe.moe.dispatch import combine, dispatch

logger = logging.getLogger(__name__)


def model_from_checkpoint(ckpt_dir: Path) -> GPTMoE:
    """An all-experts-local (EP=1) model holding a checkpoint's parameters (any saved EP degree)."""
    manifest = read_checkpoint(ckpt_dir)
    cfg = load_config(TrainConfig, Path(ckpt_dir) / "config.yaml")
    model = GPTMoE(cfg.model)
    restore_rank_state(manifest, model, None, ExpertLayout(1, 0, cfg.model.moe.num_experts), 0, 1)
    model.eval()
    return model


def expert_arrays(model: GPTMoE) -> dict[int, dict[str, np.ndarray]]:
    """block index -> {w1, b1, w2, b2} stacks of that MoE block."""
    return {
        i: {k: getattr(b.ffn.experts, k).numpy() for k in EXPERT_TENSORS}
        for i, b in enumerate(model.blocks)
        if b.is_moe
    }


def dense_arrays(model: GPTMoE) -> dict[str, np.ndarray]:
    return {n: p.numpy() for n, p in model.named_parameters() if ".experts." not in n}


# ----------------------------------------------------------------------------- sub-graphs
class _Embed(nn.Layer):
    def __init__(self, m: GPTMoE):
        super().__init__()
        self.m = m

    def forward(self, tokens):
        return self.m.embed(tokens)


class _DenseBlock(nn.Layer):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x).x


class _MoEPre(nn.Layer):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        b = self.block
        a, _ = b.attn(b.ln1(x))
        x_mid = x + a
        h = b.ln2(x_mid).reshape([-1, x.shape[-1]])
        cfg = b.ffn.config
        d = dispatch(h, b.ffn.router(h).logits, top_k=cfg.k, capacity_factor=0.0, normalize=cfg.normalize, backend="custom")
        return x_mid, d.rows, d.counts, d.weights, d.positions


class _Experts(nn.Layer):
    def __init__(self, activation: str):
        super().__init__()
        self.activation = activation

    def forward(self, rows, counts, w1, b1, w2, b2):
        return ops.grouped_ffn(rows, counts, w1, b1, w2, b2, activation=self.activation, backend="custom")


class _MoEPost(nn.Layer):
    def forward(self, x_mid, rows, weights, positions):
        y = ops.combine(rows, weights, positions, backend="custom")
        return x_mid + y.reshape(paddle.shape(x_mid))


class _Head(nn.Layer):
    def __init__(self, m: GPTMoE):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.head(x)


def _save(layer: nn.Layer, specs: list[InputSpec], path: Path) -> str:
    static = paddle.jit.to_static(layer, input_spec=specs, full_graph=True)
    paddle.jit.save(static, str(path))
    return path.name


def export_graphs(model: GPTMoE, out: Path) -> dict:
    """Write the static sub-graphs; returns {graph name: file prefix relative to ``out``}."""
    cfg: GPTConfig = model.config
    D, E = cfg.d_model, cfg.moe.num_experts
    F = cfg.moe.d_ff or cfg.d_ff
    gdir = out / "graphs"
    gdir.mkdir(parents=True, exist_ok=True)
    x_spec = InputSpec([None, None, D], "float32", "x")
    graphs: dict = {"embed": "graphs/" + _save(_Embed(model), [InputSpec([None, None], "int64", "tokens")], gdir / "embed")}
    blocks = []
    for i, b in enumerate(model.blocks):
        if b.is_moe:
            blocks.append({"kind": "moe", "pre": "graphs/" + _save(_MoEPre(b), [x_spec], gdir / f"moe_pre_{i:02d}")})
        else:
            blocks.append({"kind": "dense", "graph": "graphs/" + _save(_DenseBlock(b), [x_spec], gdir / f"block_{i:02d}")})
    graphs["blocks"] = blocks
    rows = InputSpec([None, D], "float32", "rows")
    graphs["experts"] = "graphs/" + _save(
        _Experts(cfg.activation),
        [rows, InputSpec([E], "int32", "counts"), InputSpec([E, D, F], "float32", "w1"), InputSpec([E, F], "float32", "b1"),
         InputSpec([E, F, D], "float32", "w2"), InputSpec([E, D], "float32", "b2")],
        gdir / "experts",
    )
    graphs["moe_post"] = "graphs/" + _save(
        _MoEPost(),
        [x_spec, rows, InputSpec([None, cfg.moe_config().k], "float32", "weights"), InputSpec([None, cfg.moe_config().k], "int32", "positions")],
        gdir / "moe_post",
    )
    graphs["head"] = "graphs/" + _save(_Head(model), [x_spec], gdir / "head")
    return graphs


def export_package(model: GPTMoE, out: Path, *, graphs: bool = True) -> Path:
    """Write the package for ``model`` (all experts local) into ``out`` (replaced if present)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "experts").mkdir(parents=True)
    model.eval()
    sections = []
    for i, arrays in expert_arrays(model).items():
        rel = f"experts/layer_{i:02d}.bin"
        specs, size, sha = write_section(tmp / rel, arrays)
        sections.append(Section(i, rel, size, sha, specs))
    np.savez(tmp / "dense.npz", **dense_arrays(model))
    from paddle_semoe.engine.checkpoint import sha256_file

    graph_index = export_graphs(model, tmp) if graphs else {}
    write_manifest(tmp, to_dict(model.config), sections, sha256_file(tmp / "dense.npz"), graph_index)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info(
        "exported %d MoE layers (%.1f MiB of experts) + dense weights%s to %s",
        len(sections), sum(s.nbytes for s in sections) / 2**20, " + static graphs" if graphs else "", out,
    )
    return out
