"""Deployment through Paddle Inference: the exported static sub-graphs, experts from the ring.

Each sub-graph of the package (see export.py) gets a ``paddle.inference`` predictor; the
expert graph takes the expert weights as inputs, so the same :mod:`ring` providers feed it
layer by layer (shared experts are dense: they run inside the ``moe_pre`` graphs, whose extra
output ``moe_post`` adds). The compiled custom ops are loaded through
:func:`paddle_semoe.ops.resolve_backend`. The block graphs take and return key/value caches,
so generation prefills the prompt once and then decodes one token per step, like the dygraph
runner (routing is dropless in both, so they give the same tokens).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import paddle
from paddle import inference as pi

from paddle_semoe import ops
from paddle_semoe.inference.package import Manifest, PackageError
from paddle_semoe.inference.ring import RingExperts
from paddle_semoe.inference.runner import GenerationResult, ServeConfig, _pick, build_provider

logger = logging.getLogger(__name__)

_CPU = paddle.CPUPlace()  # the predictors run on CPU (disable_gpu): their inputs live there


class _Graph:
    """One Paddle Inference predictor run on CPU paddle Tensors.

    Inputs and outputs are ``paddle.Tensor`` (the ``run(list)`` overload): inputs are shared with
    the predictor (no copy; the caller keeps them alive until the call returns), and each output
    is the allocation the predictor wrote, which its next run overwrites: an output is valid
    until the same graph runs again. Activations are consumed before that; the key/value caches
    are the next step's inputs of the same graph, so the model clones them."""

    def __init__(self, root: Path, prefix: str, threads: int):
        model, params = root / f"{prefix}.json", root / f"{prefix}.pdiparams"
        if not model.exists():
            raise PackageError(f"inference package graph missing: {model}")
        cfg = pi.Config(str(model), str(params)) if params.exists() else pi.Config(str(model), "")
        cfg.disable_gpu()
        cfg.disable_glog_info()
        # oneDNN re-creates its primitives for every new input shape: 2x a decode step's block graph
        # time (~600 vs ~300 us), so the graphs run the native CPU kernels, the dygraph path's.
        cfg.disable_onednn()
        cfg.set_cpu_math_library_num_threads(threads)
        self.name = prefix
        self.predictor = pi.create_predictor(cfg)
        self.inputs = self.predictor.get_input_names()
        self.outputs = self.predictor.get_output_names()

    def __call__(self, *tensors: paddle.Tensor) -> list[paddle.Tensor]:
        """CPU tensors in the graph's input order -> its outputs, in output order."""
        if len(tensors) != len(self.inputs):
            raise ValueError(f"graph {self.name} expects {len(self.inputs)} inputs, got {len(tensors)}")
        return self.predictor.run(list(tensors))


class PaddleInferenceModel:
    """GPT-MoE served through Paddle Inference predictors with ring-supplied expert weights.

    ``threads``: the math library's threads during each predictor run
    (``set_cpu_math_library_num_threads``); 1, the dygraph path's default, was the faster setting
    for a decode step's few rows on 2 shared cores."""

    def __init__(self, manifest: Manifest, serve: ServeConfig, threads: int = 1):
        if not manifest.graphs:
            raise PackageError(f"package {manifest.root} was exported without static graphs (export without --no-graphs)")
        if not manifest.graphs.get("kv_cache"):
            raise PackageError(f"package {manifest.root} has static graphs without key/value caches (exported by an "
                               "older version): re-export it with tools/export.py")
        ops.resolve_backend("custom")  # the graphs contain the custom ops
        root, g = manifest.root, manifest.graphs
        self.manifest = manifest
        self.embed = _Graph(root, g["embed"], threads)
        self.blocks = [("moe", _Graph(root, b["pre"], threads)) if b["kind"] == "moe"
                       else ("dense", _Graph(root, b["graph"], threads)) for b in g["blocks"]]
        has_moe = any(b["kind"] == "moe" for b in g["blocks"])  # a dense model has no expert graphs
        self.experts_graph = _Graph(root, g["experts"], threads) if has_moe else None
        self.post = _Graph(root, g["moe_post"], threads) if has_moe else None
        # shared experts: every moe_pre has an 8th output (their rows [T, D]) that moe_post adds
        for kind, graph in self.blocks:
            if kind == "moe" and self.post is not None and len(graph.outputs) - 3 != len(self.post.inputs):
                raise PackageError(
                    f"package {root}: a moe_pre graph has {len(graph.outputs)} outputs but moe_post takes "
                    f"{len(self.post.inputs)} inputs (expected outputs - 3): re-export the package"
                )
        self.head = _Graph(root, g["head"], threads)
        self.experts = build_provider(manifest, serve)
        # ``predictor.run`` keeps the GIL for a whole graph: the ring's loader, woken by
        # ``release``, would start its read two graph runs later; yielding once after ``release``
        # starts it at once (ring:1 decodes 20-25% faster on the quickstart model).
        self._yield_after_release = isinstance(self.experts, RingExperts)
        cfg = manifest.model
        self._heads, self._d_head = int(cfg["n_heads"]), int(cfg["d_model"]) // int(cfg["n_heads"])

    def close(self) -> None:
        self.experts.close()

    def empty_caches(self, batch: int) -> list[tuple[paddle.Tensor, paddle.Tensor]]:
        """One (k, v) pair ``float32 [batch, H, 0, Dh]`` per block: no past positions."""
        empty = paddle.to_tensor(np.zeros((batch, self._heads, 0, self._d_head), np.float32), place=_CPU)
        return [(empty, empty) for _ in self.blocks]

    def forward(self, tokens: np.ndarray) -> np.ndarray:
        """int64 [B, S] -> logits float32 [B, S, V] (whole sequence, no past)."""
        logits, _ = self.step(tokens, self.empty_caches(tokens.shape[0]))
        return logits

    def step(self, tokens: np.ndarray | paddle.Tensor, caches: list[tuple[paddle.Tensor, paddle.Tensor]]
             ) -> tuple[np.ndarray, list[tuple[paddle.Tensor, paddle.Tensor]]]:
        """int64 [B, S] after the past positions held in ``caches`` (one (k, v) ``[B, H, P, Dh]``
        per block) -> (logits float32 [B, S, V] as numpy, the caches extended to P + S)."""
        if not isinstance(tokens, paddle.Tensor):
            tokens = paddle.to_tensor(np.ascontiguousarray(tokens, dtype=np.int64), place=_CPU)
        past = paddle.to_tensor(np.asarray([caches[0][0].shape[2]], np.int64), place=_CPU)
        (x,) = self.embed(tokens, past)
        new_caches = []
        j = 0
        for (kind, graph), (k_past, v_past) in zip(self.blocks, caches):
            x, k, v, *moe = graph(x, k_past, v_past)  # an MoE block's x is x_mid, then its routing
            new_caches.append((k.clone(), v.clone()))  # see _Graph: outliving the graph's next run
            if kind == "dense":
                continue
            assert self.experts_graph is not None and self.post is not None  # a package with MoE blocks has both
            rows, counts, weights, positions, *shared = moe  # shared: [] or [shared experts' rows]
            w = self.experts.acquire(j)
            try:
                (out,) = self.experts_graph(rows, counts, w["w1"], w["b1"], w["w2"], w["b2"])
            finally:
                self.experts.release(j)
            if self._yield_after_release:
                time.sleep(0)  # let the loader thread take the GIL and start its read (see __init__)
            (x,) = self.post(x, out, weights, positions, *shared)
            j += 1
        (logits,) = self.head(x)
        return logits.numpy(), new_caches

    def generate(self, prompts: np.ndarray, max_new_tokens: int, *, greedy: bool = True, temperature: float = 1.0,
                 top_k: int = 0, seed: int = 0) -> GenerationResult:
        rng = np.random.default_rng(seed)
        out = prompts.astype(np.int64)
        t0 = time.perf_counter()
        forward_tokens = 0
        caches = self.empty_caches(out.shape[0])
        feed = out
        for _ in range(max_new_tokens):
            logits, caches = self.step(feed, caches)  # the prompt once, then one token per step
            forward_tokens += feed.size
            nxt = _pick(logits[:, -1, :].astype(np.float64), greedy, temperature, top_k, rng)
            out = np.concatenate([out, nxt[:, None]], axis=1)
            feed = nxt[:, None].astype(np.int64)
        return GenerationResult(out, max_new_tokens, time.perf_counter() - t0, forward_tokens)
