"""Checkpoint (or a freshly built model) -> inference package (see package.py).

The dense part is also exported as Paddle static sub-graphs (``paddle.jit.save``) for Paddle
Inference, cut at the expert boundary so a ring can supply expert weights between them:

==============  ======================================================  ==================
graph           inputs -> outputs                                       parameters
==============  ======================================================  ==================
``embed``       tokens [B,S] int64 -> x [B,S,D]                         embeddings
``block_i``     x -> x (a dense block: attention + dense FFN)           block i
``moe_pre_i``   x -> x_mid, rows, counts, weights, positions [, shared] attention, router,
                (attention, then dropless fused gate-dispatch;          shared experts
                ``shared`` [T,D]: the shared experts' output)
``experts``     rows, counts, w1, b1, w2, b2 -> rows (grouped FFN)      none (weights are inputs)
``moe_post``    x_mid, rows, weights, positions [, shared] -> x         none
                (combine, + shared, + residual)
``head``        x -> logits [B,S,V]                                     final norm, table
==============  ======================================================  ==================

The custom ops appear in ``moe_pre``/``experts``/``moe_post`` and survive export through their
InferShape/InferDtype functions. Shared experts are dense parameters (in ``moe_pre``), so every
expert-serving mode feeds the same graphs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import paddle
import paddle.nn as nn
from paddle.static import InputSpec

from paddle_semoe import ops
from paddle_semoe.config import from_dict, to_dict
from paddle_semoe.io.checkpoint import CheckpointError, read_manifest as read_checkpoint
from paddle_semoe.io.files import FileRecord, fsync_dir, record_of, sha256_file, write_atomic
from paddle_semoe.io.model_state import ExpertLayout, restore_rank_state
from paddle_semoe.inference.package import (
    EXPERT_TENSORS,
    READABLE_FORMATS,
    PackageError,
    Section,
    expert_checksums,
    write_manifest,
    write_quantized_section,
    write_section,
)
from paddle_semoe.models.gpt import Block, GPTConfig, GPTMoE, KVCache
from paddle_semoe.moe import GroupedExperts, MoELayer

logger = logging.getLogger(__name__)


def model_from_checkpoint(ckpt_dir: Path) -> GPTMoE:
    """An all-experts-local (EP=1) model holding a checkpoint's parameters (any saved EP degree);
    the model config comes from the manifest (``meta["model"]``, written by the trainer)."""
    manifest = read_checkpoint(ckpt_dir)
    if "model" not in manifest.meta:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no model config in its manifest: not a GPT-MoE checkpoint")
    config = from_dict(GPTConfig, manifest.meta["model"])
    model = GPTMoE(config)
    restore_rank_state(manifest, model, None, ExpertLayout(1, 0, config.moe.num_experts), 0, 1)
    model.eval()
    return model


def checkpoint_tokenizer_files(ckpt_dir: Path) -> list[tuple[str, Path]]:
    """``(name, path)`` of the tokenizer files a checkpoint carries (``tokenizer/...`` in its
    verified manifest); empty for models trained on the built-in byte corpora."""
    manifest = read_checkpoint(ckpt_dir)
    return [(name, Path(ckpt_dir) / name) for name in sorted(manifest.files) if name.startswith("tokenizer/")]


def expert_arrays(model: GPTMoE) -> dict[int, dict[str, np.ndarray]]:
    """block index -> {w1, b1, w2, b2} stacks of that MoE block."""
    return {
        i: {k: getattr(b.ffn.experts, k).numpy() for k in EXPERT_TENSORS}
        for i, b in enumerate(model.blocks)
        if b.is_moe
    }


def dense_arrays(model: GPTMoE) -> dict[str, np.ndarray]:
    """Every non-expert parameter, plus the persistable buffers (the aux-free routers' balance bias)."""
    params = {n for n, _ in model.named_parameters()}
    out = {n: p.numpy() for n, p in model.named_parameters() if ".experts." not in n}
    out.update({n: b.numpy() for n, b in model.state_dict().items() if n not in params})
    return out


# ----------------------------------------------------------------------------- sub-graphs
# Each graph calls the pieces of the training Block / MoELayer (attend, ln2, route, the experts'
# grouped FFN, combine): the exported model is cut from the code that trains, not a copy of it.
# Key/value caches travel between the graphs: a block graph takes the caches of its past
# positions (k_past, v_past [B, H, P, Dh]; P = 0 for a prompt) and returns them extended by the
# new positions, so generation decodes one token per step, as the dygraph runner does.
class _Embed(nn.Layer):
    def __init__(self, m: GPTMoE):
        super().__init__()
        self.m = m

    def forward(self, tokens, past):
        """tokens int64 [B, S] at positions past .. past + S - 1 (past: int64 [1])."""
        return self.m.embed(tokens, past[0])


class _DenseBlock(nn.Layer):
    """``(x, k_past, v_past) -> (x, k, v)``."""

    def __init__(self, block: Block):
        super().__init__()
        self.block = block

    def forward(self, x, k_past, v_past):
        out = self.block(x, KVCache(k_past, v_past))
        return out.x, out.cache.k, out.cache.v


class _MoEPre(nn.Layer):
    """Attention, then routing: ``(x, k_past, v_past) -> x_mid, k, v, rows, counts, weights,
    positions`` and, when the layer has shared experts, ``shared`` [T, D] (their output on the
    same normed input)."""

    def __init__(self, block: Block, layer: MoELayer):
        super().__init__()
        self.block = block
        self.layer = layer

    def forward(self, x, k_past, v_past):
        x_mid, cache = self.block.attend(x, KVCache(k_past, v_past))
        h_TD = self.block.ln2(x_mid).reshape([-1, x.shape[-1]])
        d = self.layer.route(h_TD).dispatch
        if self.layer.shared_experts is None:
            return x_mid, cache.k, cache.v, d.rows, d.counts, d.weights, d.positions
        return x_mid, cache.k, cache.v, d.rows, d.counts, d.weights, d.positions, self.layer.shared_experts(h_TD)


class _Experts(nn.Layer):
    """The grouped FFN with the weights as inputs (a ring supplies them between graphs)."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        self._compute = experts.compute  # the method only: the graph holds no expert parameters

    def forward(self, rows, counts, w1, b1, w2, b2):
        return self._compute(rows, counts, w1, b1, w2, b2)


class _MoEPost(nn.Layer):
    """``x_mid + combine`` or, given the shared experts' output, ``x_mid + (combine + shared)``:
    the order of ``MoELayer.forward`` then ``Block.forward``."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self._combine = layer.combine  # the method only: the graph holds no parameters

    def forward(self, x_mid, rows, weights, positions, shared=None):
        y = self._combine(rows, weights, positions)
        return x_mid + (y if shared is None else y + shared).reshape(paddle.shape(x_mid))


class _Head(nn.Layer):
    def __init__(self, m: GPTMoE):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.head(x)


def _save(layer: nn.Layer, specs: list[InputSpec], out: Path, name: str) -> str:
    """Save ``layer`` as the static graph ``graphs/<name>`` under ``out``; returns that prefix."""
    static = paddle.jit.to_static(layer, input_spec=specs, full_graph=True)
    paddle.jit.save(static, str(out / "graphs" / name))
    return f"graphs/{name}"


def export_graphs(model: GPTMoE, out: Path) -> dict:
    """Write the static sub-graphs; returns {graph name: file prefix relative to ``out``}.

    The graphs contain the compiled custom ops (Paddle Inference runs them), so the model's
    ops backend must resolve to them; MoE routing is exported dropless.
    """
    cfg: GPTConfig = model.config
    if ops.resolve_backend(cfg.ops_backend) is None:
        raise ValueError(
            f"static graphs need the compiled custom ops, but model.ops_backend={cfg.ops_backend!r} resolves to the "
            "pure-Paddle reference (export with --no-graphs, or build the ops)"
        )
    moe_cfg = cfg.moe_config()
    D, E, F, K, H = cfg.d_model, moe_cfg.num_experts, moe_cfg.d_ff, moe_cfg.k, cfg.n_heads
    (out / "graphs").mkdir(parents=True, exist_ok=True)
    x_spec = InputSpec([None, None, D], "float32", "x")
    block_specs = [x_spec] + [InputSpec([None, H, None, D // H], "float32", n)
                              for n in ("k_past", "v_past")]
    tokens_specs = [InputSpec([None, None], "int64", "tokens"), InputSpec([1], "int64", "past")]
    graphs: dict = {"embed": _save(_Embed(model), tokens_specs, out, "embed"), "kv_cache": True}
    blocks = []
    moe_layers = model.moe_layers()
    was_dropless = [layer.eval_dropless for layer in moe_layers]
    model.eval()
    model.set_eval_dropless(True)
    try:
        for i, b in enumerate(model.blocks):
            if isinstance(b.ffn, MoELayer):
                pre = _save(_MoEPre(b, b.ffn), block_specs, out, f"moe_pre_{i:02d}")
                blocks.append({"kind": "moe", "pre": pre})
            else:
                graph = _save(_DenseBlock(b), block_specs, out, f"block_{i:02d}")
                blocks.append({"kind": "dense", "graph": graph})
    finally:
        for layer, flag in zip(moe_layers, was_dropless):
            layer.eval_dropless = flag
    graphs["blocks"] = blocks
    if moe_layers:  # one experts graph and one combine graph serve every MoE layer (same code, no parameters)
        rows = InputSpec([None, D], "float32", "rows")
        expert_specs = [rows, InputSpec([E], "int32", "counts"),
                        InputSpec([E, D, F], "float32", "w1"), InputSpec([E, F], "float32", "b1"),
                        InputSpec([E, F, D], "float32", "w2"), InputSpec([E, D], "float32", "b2")]
        graphs["experts"] = _save(_Experts(moe_layers[0].experts), expert_specs, out, "experts")
        post_specs = [x_spec, rows, InputSpec([None, K], "float32", "weights"),
                      InputSpec([None, K], "int32", "positions")]
        if moe_cfg.num_shared_experts > 0:  # every MoE layer has them (one MoEConfig for all)
            post_specs.append(InputSpec([None, D], "float32", "shared"))
        graphs["moe_post"] = _save(_MoEPost(moe_layers[0]), post_specs, out, "moe_post")
    graphs["head"] = _save(_Head(model), [x_spec], out, "head")
    return graphs


def _is_package(path: Path) -> bool:
    """True when ``path`` holds an inference package (a ``manifest.json`` of a readable format)."""
    try:
        return json.loads((path / "manifest.json").read_text()).get("format") in READABLE_FORMATS
    except (OSError, ValueError, AttributeError):
        return False


def check_export_target(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that export must not touch: a non-empty directory that is not an earlier
    package (never deleted), a file, or an earlier package without ``overwrite``."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise PackageError(f"--out {out} exists and is not a directory: refusing to replace it")
    if not out.exists() or not any(out.iterdir()):
        return
    if not _is_package(out):
        raise PackageError(
            f"--out {out} is a non-empty directory that is not an inference package: refusing to touch it "
            "(export never deletes what it did not create; pick a new or empty directory)"
        )
    if not overwrite:
        raise PackageError(f"--out {out} already holds an inference package: pass --overwrite to replace it")


def _package_records(root: Path, recorded: set[str]) -> list[FileRecord]:
    """Records of every file under ``root`` but its manifest not yet in ``recorded`` (the extra
    files, the graphs and their .info files, ...), so the manifest covers every file."""
    names = (p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file())
    return [record_of(root / n, n) for n in names if n not in recorded and n != "manifest.json"]


def export_package(model: GPTMoE, out: Path, *, graphs: bool = True, extra_files: Sequence[tuple[str, Path]] = (),
                   int8: bool = False, overwrite: bool = False, int4: bool = False) -> Path:
    """Write the package for ``model`` (all experts local) into ``out``, atomically.

    ``out`` must be new, empty, or (with ``overwrite``) an earlier package; anything else is
    refused (:func:`check_export_target`). The package is written into a temporary directory
    beside ``out`` and renamed into place; on failure the temporary directory is removed and an
    earlier package at ``out`` is left intact. Every file is recorded (SHA-256, size) in the
    manifest and verified on load.

    ``int8``: also write weight-only int8 copies of the expert sections
    (``experts/layer_XX.int8.bin``: per-output-channel scales; serve with ``quant="int8"``).
    ``int4``: also write weight-only int4 copies (``experts/layer_XX.int4.bin``: two values per
    byte, a scale per output channel and group of 32 input rows; serve with ``quant="int4"``).

    ``extra_files``: ``(name in the package, source path)`` copied in and recorded with their
    SHA-256 (the checkpoint's tokenizer, so generation decodes with the training tokenizer)."""
    out = Path(out)
    check_export_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        sections, graph_index = _write_package(model, tmp, graphs, extra_files, int8, int4)
        _publish_package(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "exported %d MoE layers (%.1f MiB of experts) + dense weights%s to %s",
        len(sections), sum(s.nbytes for s in sections) / 2**20, " + static graphs" if graph_index else "", out,
    )
    return out


def _write_package(model: GPTMoE, tmp: Path, graphs: bool, extra_files: Sequence[tuple[str, Path]],
                   int8: bool, int4: bool) -> tuple[list[Section], dict]:
    (tmp / "experts").mkdir(parents=True)
    model.eval()
    sections: list[Section] = []
    quantized: dict[str, list[Section]] = {"int8": [], "int4": []}
    for i, arrays in expert_arrays(model).items():
        rel = f"experts/layer_{i:02d}.bin"
        specs, size, sha = write_section(tmp / rel, arrays)
        w1, w2 = arrays["w1"], arrays["w2"]
        sections.append(Section(i, rel, size, sha, specs, expert_checksums(w1, w2)))
        for q in [q for q, on in (("int8", int8), ("int4", int4)) if on]:
            rel = f"experts/layer_{i:02d}.{q}.bin"
            specs, size, sha, crc = write_quantized_section(tmp / rel, w1, w2, q)
            quantized[q].append(Section(i, rel, size, sha, specs, crc))
    dense: dict[str, Any] = dense_arrays(model)  # (numpy's stub would read a key as allow_pickle)
    np.savez(tmp / "dense.npz", **dense)

    graph_index = export_graphs(model, tmp) if graphs else {}
    for name, src in extra_files:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(tmp / name, Path(src).read_bytes())
    section_files = {s.file for s in sections + quantized["int8"] + quantized["int4"]}
    extra = _package_records(tmp, {"dense.npz", *section_files})
    write_manifest(tmp, to_dict(model.config), sections, sha256_file(tmp / "dense.npz"),
                   graph_index, extra, quantized["int8"], quantized["int4"])
    return sections, graph_index


def _publish_package(tmp: Path, out: Path) -> None:
    """Rename the finished package ``tmp`` to ``out``; an earlier package at ``out`` is moved
    aside first and removed only once the new one is in place (restored if the rename fails)."""
    backup = None
    if out.exists() and any(out.iterdir()):
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, backup / "pkg")
    elif out.exists():
        out.rmdir()  # empty: nothing of anyone's is lost
    try:
        os.replace(tmp, out)
    except BaseException:
        if backup is not None:
            os.replace(backup / "pkg", out)
            shutil.rmtree(backup, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
