"""GPT-MoE inference with dense weights resident and expert weights from a provider.

The model skeleton is built under ``paddle.LazyGuard``: dense parameters are materialized
and loaded from the package; the MoE layers' own expert parameters are never allocated. Each
MoE block routes its tokens, then runs the grouped expert op on the weights the provider
(:mod:`paddle_semoe.inference.ring`) hands out for that layer, then combines. Generation uses
a key/value cache (one prefill pass, then one token per step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import paddle

from paddle_semoe import ops
from paddle_semoe.config import from_dict
from paddle_semoe.inference.package import Manifest, load_dense
from paddle_semoe.inference.ring import (
    DiskSource,
    HostSource,
    OnDemandExperts,
    ResidentExperts,
    RingExperts,
    slots_for_budget,
)
from paddle_semoe.models.gpt import Block, GPTConfig, GPTMoE, KVCache
from paddle_semoe.moe import MoELayer
from paddle_semoe.moe.dispatch import Dispatch, combine, dispatch

logger = logging.getLogger(__name__)

MODES = ("resident", "ring", "naive")
SOURCES = ("host", "disk")


@dataclass(frozen=True)
class ServeConfig:
    """How expert weights are served.

    Attributes:
        mode: ``resident`` (all experts in memory), ``ring`` (K slots, async loads),
            ``naive`` (one buffer, synchronous load per layer).
        num_slots: K for ``ring``; None: derived from ``budget_bytes``.
        budget_bytes: expert bytes the "device" may hold (ring); used when num_slots is None.
        source: ``host`` (sections cached in host memory) or ``disk`` (streamed from files).
        direct_io: with ``disk``, read with O_DIRECT so the page cache cannot serve the reads.
    """

    mode: str = "ring"
    num_slots: int | None = None
    budget_bytes: int | None = None
    source: str = "disk"
    direct_io: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.mode == "ring" and self.num_slots is None and self.budget_bytes is None:
            raise ValueError("ring mode needs num_slots or budget_bytes")
        if self.num_slots is not None and self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")


def build_provider(manifest: Manifest, serve: ServeConfig, trace: bool = False):
    source = HostSource(manifest) if serve.source == "host" else DiskSource(manifest, direct=serve.direct_io)
    if serve.mode == "resident":
        return ResidentExperts(manifest, source, trace)
    if serve.mode == "naive":
        return OnDemandExperts(manifest, source, trace)
    k = serve.num_slots if serve.num_slots is not None else slots_for_budget(manifest, serve.budget_bytes)
    return RingExperts(manifest, source, k, trace)


def route_for_inference(layer: MoELayer, x_TD: paddle.Tensor) -> Dispatch:
    """Dropless routing (no capacity): a token's output does not depend on how many other
    tokens share its forward pass, so cached decoding, full recomputation and any batch
    size give the same tokens."""
    cfg = layer.config
    return dispatch(
        x_TD, layer.router(x_TD).logits, top_k=cfg.k, capacity_factor=0.0, normalize=cfg.normalize,
        backend=cfg.ops_backend,
    )


def build_skeleton(manifest: Manifest) -> GPTMoE:
    """The GPT-MoE with dense weights loaded and expert parameters left unallocated."""
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
    model.eval()
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
    experts: object  # ResidentExperts | RingExperts | OnDemandExperts
    moe_blocks: list[int] = field(default_factory=list)

    @classmethod
    def load(cls, manifest: Manifest, serve: ServeConfig, trace: bool = False) -> "InferenceModel":
        model = build_skeleton(manifest)
        moe_blocks = [i for i, b in enumerate(model.blocks) if b.is_moe]
        if moe_blocks != [s.layer for s in manifest.sections]:
            raise ValueError(f"package sections {[s.layer for s in manifest.sections]} != model MoE blocks {moe_blocks}")
        return cls(manifest, model, build_provider(manifest, serve, trace), moe_blocks)

    def close(self) -> None:
        self.experts.close()

    # -------------------------------------------------------------- one forward pass
    def _moe(self, block: Block, j: int, h: paddle.Tensor) -> paddle.Tensor:
        layer = block.ffn
        d = route_for_inference(layer, h.reshape([-1, h.shape[-1]]))
        w = self.experts.acquire(j)
        try:
            rows = ops.grouped_ffn(d.rows, d.counts, w["w1"], w["b1"], w["w2"], w["b2"], activation=layer.config.activation)
        finally:
            self.experts.release(j)
        return combine(rows, d).reshape(h.shape)

    @paddle.no_grad()
    def forward(self, tokens: paddle.Tensor, caches: list[KVCache] | None = None) -> tuple[paddle.Tensor, list[KVCache]]:
        """tokens int64 [B, S] -> (logits [B, S, V], new caches)."""
        m = self.model
        past = caches[0].k.shape[2] if caches else 0
        x = m.embed(tokens, past)
        new_caches = []
        j = 0
        for i, block in enumerate(m.blocks):
            a, cache = block.attn(block.ln1(x), caches[i] if caches else None)
            new_caches.append(cache)
            x = x + a
            h = block.ln2(x)
            if block.is_moe:
                x = x + self._moe(block, j, h)
                j += 1
            else:
                x = x + block.ffn(h)
        return m.head(x), new_caches

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
            last = logits[:, -1, :].numpy().astype(np.float64)
            nxt = _pick(last, greedy, temperature, top_k, rng)
            out = np.concatenate([out, nxt[:, None]], axis=1)
            if step + 1 < max_new_tokens:
                logits, caches = self.forward(paddle.to_tensor(nxt[:, None]), caches)
                forward_tokens += nxt.size
        return GenerationResult(out, max_new_tokens, time.perf_counter() - t0, forward_tokens)


def _pick(logits: np.ndarray, greedy: bool, temperature: float, top_k: int, rng: np.random.Generator) -> np.ndarray:
    if greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    z = logits / max(temperature, 1e-6)
    if top_k > 0:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[1], p=row) for row in p], dtype=np.int64)
