"""Deployment through Paddle Inference: the exported static sub-graphs, experts from the ring.

Each sub-graph of the package (see export.py) gets a ``paddle.inference`` predictor; the
expert graph takes the expert weights as inputs, so the same :mod:`ring` providers feed it
layer by layer (a model's shared experts are dense: they run inside its ``moe_pre`` graphs, whose
extra output ``moe_post`` adds). The compiled custom ops must be loaded in the serving process (they are, via
:func:`paddle_semoe.ops.resolve_backend`). There is no key/value cache in the exported
graphs: every generation step recomputes the whole sequence (routing is dropless, so this
gives the same tokens as cached decoding).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from paddle import inference as pi

from paddle_semoe import ops
from paddle_semoe.inference.package import Manifest, PackageError
from paddle_semoe.inference.runner import GenerationResult, ServeConfig, _pick, build_provider

logger = logging.getLogger(__name__)


class _Graph:
    """One Paddle Inference predictor with named numpy inputs/outputs."""

    def __init__(self, root: Path, prefix: str, threads: int):
        model, params = root / f"{prefix}.json", root / f"{prefix}.pdiparams"
        if not model.exists():
            raise PackageError(f"inference package graph missing: {model}")
        cfg = pi.Config(str(model), str(params)) if params.exists() else pi.Config(str(model), "")
        cfg.disable_gpu()
        cfg.disable_glog_info()
        cfg.set_cpu_math_library_num_threads(threads)
        self.predictor = pi.create_predictor(cfg)
        self.inputs = self.predictor.get_input_names()
        self.outputs = self.predictor.get_output_names()

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        if len(arrays) != len(self.inputs):
            raise ValueError(f"graph expects {len(self.inputs)} inputs, got {len(arrays)}")
        for name, arr in zip(self.inputs, arrays):
            self.predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(arr))
        self.predictor.run()
        return [self.predictor.get_output_handle(n).copy_to_cpu() for n in self.outputs]


class PaddleInferenceModel:
    """GPT-MoE served through Paddle Inference predictors with ring-supplied expert weights."""

    def __init__(self, manifest: Manifest, serve: ServeConfig, threads: int = 1):
        if not manifest.graphs:
            raise PackageError(f"package {manifest.root} was exported without static graphs (export without --no-graphs)")
        ops.resolve_backend("custom")  # the graphs contain the custom ops
        root, g = manifest.root, manifest.graphs
        self.manifest = manifest
        self.embed = _Graph(root, g["embed"], threads)
        self.blocks = [
            ("moe", _Graph(root, b["pre"], threads)) if b["kind"] == "moe" else ("dense", _Graph(root, b["graph"], threads))
            for b in g["blocks"]
        ]
        has_moe = any(b["kind"] == "moe" for b in g["blocks"])  # a dense model has no expert graphs
        self.experts_graph = _Graph(root, g["experts"], threads) if has_moe else None
        self.post = _Graph(root, g["moe_post"], threads) if has_moe else None
        # shared experts: every moe_pre has a 6th output (their rows [T, D]) that moe_post adds
        for kind, graph in self.blocks:
            if kind == "moe" and self.post is not None and len(graph.outputs) - 1 != len(self.post.inputs):
                raise PackageError(
                    f"package {root}: a moe_pre graph has {len(graph.outputs)} outputs but moe_post takes "
                    f"{len(self.post.inputs)} inputs (expected outputs - 1): re-export the package"
                )
        self.head = _Graph(root, g["head"], threads)
        self.experts = build_provider(manifest, serve)

    def close(self) -> None:
        self.experts.close()

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """int64 [B, S] -> logits float32 [B, S, V] (whole sequence)."""
        (x,) = self.embed(tokens.astype(np.int64))
        j = 0
        for kind, graph in self.blocks:
            if kind == "dense":
                (x,) = graph(x)
                continue
            assert self.experts_graph is not None and self.post is not None  # a package with MoE blocks has both
            x_mid, rows, counts, weights, positions, *shared = graph(x)  # shared: [] or [shared experts' rows]
            w = self.experts.acquire(j)
            try:
                (out,) = self.experts_graph(rows, counts, *(w[k].numpy() for k in ("w1", "b1", "w2", "b2")))
            finally:
                self.experts.release(j)
            (x,) = self.post(x_mid, out, weights, positions, *shared)
            j += 1
        (logits,) = self.head(x)
        return logits

    def generate(self, prompts: np.ndarray, max_new_tokens: int, *, greedy: bool = True, temperature: float = 1.0,
                 top_k: int = 0, seed: int = 0) -> GenerationResult:
        rng = np.random.default_rng(seed)
        out = prompts.astype(np.int64)
        t0 = time.perf_counter()
        forward_tokens = 0
        for _ in range(max_new_tokens):
            logits = self.forward(out)
            forward_tokens += out.size
            nxt = _pick(logits[:, -1, :].astype(np.float64), greedy, temperature, top_k, rng)
            out = np.concatenate([out, nxt[:, None]], axis=1)
        return GenerationResult(out, max_new_tokens, time.perf_counter() - t0, forward_tokens)
