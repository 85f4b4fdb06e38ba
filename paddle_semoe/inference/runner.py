"""GPT-MoE inference with dense weights resident and expert weights from a provider.

Serving runs the training model's own code: the :class:`~paddle_semoe.models.gpt.GPTMoE`
skeleton is built under ``paddle.LazyGuard``, its dense parameters are loaded from the package,
and each MoE layer's ``GroupedExperts`` gets a weight source
(:class:`~paddle_semoe.inference.ring.LayerWeights`) running the layer's grouped FFN on the
weights a provider holds; the layers' own expert parameters are never allocated. Routing is
dropless, so cached decoding, full recomputation and any batch size give the same tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import paddle

from paddle_semoe.config import from_dict
from paddle_semoe.inference.cache import (
    QUANTS,
    DiskExpertReader,
    ExpertCache,
    ExpertReader,
    HostExpertReader,
    slots_for_expert_budget,
)
from paddle_semoe.inference.package import Manifest, load_dense
from paddle_semoe.inference.ring import (
    DiskSource,
    ExpertProvider,
    ExpertSource,
    HostSource,
    LayerWeights,
    OnDemandExperts,
    ResidentExperts,
    RingExperts,
    slots_for_budget,
)
from paddle_semoe.models.gpt import GPTConfig, GPTMoE, KVCache
from paddle_semoe.moe import MoELayer
from paddle_semoe.moe.routers import AuxFreeRouter, Router

logger = logging.getLogger(__name__)

MODES = ("resident", "ring", "naive", "cache")
SOURCES = ("host", "disk")


@dataclass(frozen=True)
class ServeConfig:
    """How expert weights are served.

    Attributes:
        mode: ``resident`` (all experts in memory), ``ring`` (K layer slots, async loads),
            ``naive`` (one buffer, synchronous load per layer), ``cache`` (S single-expert
            slots: only routed experts are loaded, hot experts stay; see cache.py).
        num_slots: K layer slots for ``ring``, S expert slots for ``cache``; None: derived
            from ``budget_bytes``.
        budget_bytes: expert bytes the "device" may hold (ring, cache); used when num_slots is None.
        source: ``host`` (sections cached in host memory) or ``disk`` (streamed from files).
        direct_io: with ``disk``, read with O_DIRECT so the page cache cannot serve the reads.
        prefetch: ``cache``: pre-gating, layer j+1's router on layer j's input picks the experts
            to load while layer j computes.
        verify_reads: ``cache``: check every expert read against its CRC-32.
        lfu_beta, lfu_decay_every: ``cache``: hit counters decay by ``lfu_beta`` every
            ``lfu_decay_every`` forward passes.
        record_routing: ``cache``: keep the routing trace (for the Belady comparison).
        quant: ``cache``: serve the ``float32``, ``int8`` or ``int4`` expert sections (weight-only
            quantized: a quarter / an eighth of the bytes; see :mod:`paddle_semoe.inference.cache`).
        loader_threads: ``cache``: concurrent expert loads.
    """

    mode: str = "ring"
    num_slots: int | None = None
    budget_bytes: int | None = None
    source: str = "disk"
    direct_io: bool = True
    prefetch: bool = True
    verify_reads: bool = False
    lfu_beta: float = 0.9
    lfu_decay_every: int = 1
    record_routing: bool = False
    quant: str = "float32"
    loader_threads: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.mode in ("ring", "cache") and self.num_slots is None and self.budget_bytes is None:
            raise ValueError(f"{self.mode} mode needs num_slots or budget_bytes")
        if not 0.0 < self.lfu_beta <= 1.0:
            raise ValueError(f"lfu_beta must be in (0, 1], got {self.lfu_beta}")
        for name in ("lfu_decay_every", "loader_threads", "num_slots"):
            if (v := getattr(self, name)) is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {QUANTS}, got {self.quant!r}")
        if self.quant != "float32" and self.mode != "cache":
            raise ValueError(f"quant={self.quant!r} is served by mode 'cache' only, got mode {self.mode!r}")


def parse_mode(spec: str) -> tuple[str, int | None]:
    """``resident`` | ``naive`` | ``ring[:K]`` | ``cache[:S]`` -> (mode, slots or None)."""
    name, sep, k = spec.strip().partition(":")
    if name not in MODES:
        raise ValueError(f"unknown serving mode {spec!r}: expected one of resident, naive, ring[:K], cache[:S]")
    if not sep:
        return name, None
    if name in ("resident", "naive"):
        raise ValueError(f"serving mode {name!r} takes no slot count, got {spec!r}")
    try:
        n = int(k)
    except ValueError:
        raise ValueError(f"serving mode {spec!r}: the slot count must be an integer") from None
    if n < 1:
        raise ValueError(f"serving mode {spec!r}: the slot count must be >= 1")
    return name, n


def build_provider(manifest: Manifest, serve: ServeConfig, trace: bool = False) -> ExpertProvider | ExpertCache:
    if serve.mode == "cache":
        reader: ExpertReader = (HostExpertReader(manifest, serve.verify_reads, serve.quant) if serve.source == "host"
                                else DiskExpertReader(manifest, serve.direct_io, serve.verify_reads, serve.quant))
        s = (serve.num_slots if serve.num_slots is not None
             else slots_for_expert_budget(manifest, serve.budget_bytes or 0, serve.quant))
        return ExpertCache(manifest, reader, s, beta=serve.lfu_beta, decay_every=serve.lfu_decay_every,
                           record_routing=serve.record_routing, loader_threads=serve.loader_threads, trace=trace)
    source: ExpertSource = HostSource(manifest) if serve.source == "host" else DiskSource(manifest, direct=serve.direct_io)
    if serve.mode == "resident":
        return ResidentExperts(manifest, source, trace)
    if serve.mode == "naive":
        return OnDemandExperts(manifest, source, trace)
    k = serve.num_slots if serve.num_slots is not None else slots_for_budget(manifest, serve.budget_bytes or 0)
    return RingExperts(manifest, source, k, trace)


def build_skeleton(manifest: Manifest) -> GPTMoE:
    """The GPT-MoE with dense weights loaded, expert parameters left unallocated, in eval mode
    with dropless routing (attach weight sources before running it)."""
    cfg = from_dict(GPTConfig, manifest.model)
    with paddle.LazyGuard():
        model = GPTMoE(cfg)
    dense = load_dense(manifest)
    for name, p in model.named_parameters():
        if ".experts." in name:
            continue
        if name not in dense:
            raise ValueError(f"inference package {manifest.root} lacks dense parameter {name!r}")
        p.initialize()
        p.set_value(dense[name])
    params = {n for n, _ in model.named_parameters()}
    for name, b in model.state_dict().items():  # persistable buffers: the aux-free balance bias
        if name not in params:
            if name not in dense:
                raise ValueError(f"inference package {manifest.root} lacks buffer {name!r}")
            b.set_value(dense[name])
    model.eval()
    model.set_serving(True)
    return model


@dataclass
class GenerationResult:
    tokens: np.ndarray  # [B, prompt + new] int64
    new_tokens: int
    seconds: float
    forward_tokens: int  # tokens pushed through the model (prefill + decode)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens * self.tokens.shape[0] / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class InferenceModel:
    """A served GPT-MoE: ``forward`` for logits, ``generate`` for text."""

    manifest: Manifest
    model: GPTMoE
    experts: ExpertProvider | ExpertCache

    @classmethod
    def load(cls, manifest: Manifest, serve: ServeConfig, trace: bool = False) -> "InferenceModel":
        model = build_skeleton(manifest)
        moe_blocks = [i for i, b in enumerate(model.blocks) if b.is_moe]
        if moe_blocks != [s.layer for s in manifest.sections]:
            raise ValueError(f"package sections {[s.layer for s in manifest.sections]} != model MoE blocks {moe_blocks}")
        provider = build_provider(manifest, serve, trace)
        layers = model.moe_layers()
        for j, layer in enumerate(layers):  # section j = the j-th MoE layer
            layer.experts.weight_source = LayerWeights(provider, j)
        if isinstance(provider, ExpertCache) and serve.prefetch:
            for j in range(len(layers) - 1):
                layers[j].register_forward_pre_hook(_PreGate(provider, layers[j + 1], j + 1))
        return cls(manifest, model, provider)

    def close(self) -> None:
        self.experts.close()

    @paddle.no_grad()
    def forward(self, tokens: paddle.Tensor, caches: list[KVCache] | None = None) -> tuple[paddle.Tensor, list[KVCache]]:
        """tokens int64 [B, S] -> (logits [B, S, V], new caches): the training model's forward."""
        out = self.model(tokens, caches=caches)
        return out.logits, out.caches

    @paddle.no_grad()
    def generate(
        self, prompts: np.ndarray, max_new_tokens: int, *, greedy: bool = True, temperature: float = 1.0,
        top_k: int = 0, seed: int = 0,
    ) -> GenerationResult:
        """Extend int64 prompts [B, P] by ``max_new_tokens`` tokens (greedy or sampled)."""
        if prompts.ndim != 2:
            raise ValueError(f"prompts must be [batch, length], got shape {prompts.shape}")
        total = prompts.shape[1] + max_new_tokens
        if total > self.model.config.max_seq_len:
            raise ValueError(f"prompt {prompts.shape[1]} + {max_new_tokens} new tokens exceeds max_seq_len={self.model.config.max_seq_len}")
        rng = np.random.default_rng(seed)
        out = prompts.astype(np.int64)
        t0 = time.perf_counter()
        logits, caches = self.forward(paddle.to_tensor(out))
        forward_tokens = out.size
        for step in range(max_new_tokens):
            # a decode step's logits are [B, 1, V]: copy them whole (no slicing op); prefill: the last position
            last = (logits.numpy()[:, -1, :] if logits.shape[1] == 1 else logits[:, -1, :].numpy()).astype(np.float64)
            nxt = _pick(last, greedy, temperature, top_k, rng)
            out = np.concatenate([out, nxt[:, None]], axis=1)
            if step + 1 < max_new_tokens:
                logits, caches = self.forward(paddle.to_tensor(nxt[:, None]), caches)
                forward_tokens += nxt.size
        return GenerationResult(out, max_new_tokens, time.perf_counter() - t0, forward_tokens)


class _PreGate:
    """Forward pre-hook of MoE layer j: applies layer j+1's router to layer j's input (the
    normed hidden state) and asks the cache to prefetch the experts it selects (top-k per
    token, selection bias included), so they load while layer j computes.

    For a linear router (see :func:`_host_router`) the scores are one small NumPy GEMM on host
    copies of its weight and bias (cheaper than four Paddle op dispatches for a decode step's
    few rows); other routers run through Paddle. The prediction only steers which experts load
    early: the layer still routes with its own ops, so tokens and logits do not depend on it."""

    def __init__(self, cache: ExpertCache, next_layer: MoELayer, next_j: int):
        self.cache = cache
        self.router = next_layer.router
        self.k = next_layer.config.k
        self.next_j = next_j
        self._host = _host_router(self.router)

    def __call__(self, layer: MoELayer, inputs: tuple) -> None:
        x = inputs[0]
        if self._host is not None and x.dtype == paddle.float32 and x.place.is_cpu_place():
            w, bias = self._host
            scores = x.numpy().reshape(-1, w.shape[0]) @ w  # [T, E]
            if bias is not None:
                scores += bias
            E = scores.shape[-1]
            k = min(self.k, E)
            ids = np.argpartition(scores, E - k, axis=-1)[:, E - k :] if k < E else np.arange(E)[None, :]
        else:
            out = self.router(x.reshape([-1, x.shape[-1]]))
            s = out.logits if out.select_bias is None else out.logits + out.select_bias
            ids = paddle.topk(s, min(self.k, int(s.shape[-1])), axis=-1)[1].numpy()
        # one token's top-k are distinct already; several tokens' overlap
        self.cache.prefetch(self.next_j, ids.ravel().tolist() if ids.shape[0] == 1 else np.unique(ids).tolist())


def _host_router(router: Router) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(weight float32 [D, E], selection bias float32 [E] or None) of a router whose eval-mode
    scores are ``x @ weight`` and whose selection bias is None or a fixed [E] buffer; None for
    any other router (its scores or bias are computed, so they go through Paddle)."""
    cls = type(router)
    if cls.scores is not Router.scores or router.weight.dtype != paddle.float32:
        return None
    if cls.select_bias is Router.select_bias:
        bias = None
    elif isinstance(router, AuxFreeRouter) and cls.select_bias is AuxFreeRouter.select_bias:
        bias = router.balance_bias.numpy().astype(np.float32)
    else:
        return None
    return router.weight.numpy(), bias


def _pick(logits: np.ndarray, greedy: bool, temperature: float, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """Next tokens int64 [B] from float64 logits [B, V]: arg-max, or temperature/top-k sampling."""
    if greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    z = logits / max(temperature, 1e-6)
    if top_k > 0:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[1], p=row) for row in p], dtype=np.int64)
