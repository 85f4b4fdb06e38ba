"""A GPT-style decoder language model with an MoE FFN every ``moe_every`` layers.

Pre-LayerNorm blocks ``x + attn(ln(x))``, ``x + ffn(ln(x))``; the FFN of block i is an
:class:`~paddle_semoe.moe.MoELayer` when ``(i + 1) % moe_every == 0`` (``moe_every = 0``:
a dense model), else a dense FFN. Learned positions, tied input/output embeddings.
Attention supports an incremental key/value cache for generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from paddle_semoe import ops
from paddle_semoe.moe import MoEConfig, MoELayer, RoutingStats
from paddle_semoe.moe.config import ACTIVATIONS, OPS_BACKENDS


@dataclass(frozen=True)
class MoESettings:
    """The MoE FFN settings shared by every MoE block of the model (see MoEConfig)."""

    num_experts: int = 8
    gate: str = "topk"
    top_k: int = 2
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    dropless: bool = False
    normalize_topk: bool | None = None
    jitter_eps: float = 0.01
    d_ff: int | None = None  # expert hidden width; None = the model's d_ff
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        if self.d_ff is not None and self.d_ff <= 0:
            raise ValueError(f"d_ff must be positive, got {self.d_ff}")
        self.layer_config(d_model=1, d_ff=self.d_ff or 1, activation="gelu", init_std=1.0, ops_backend="auto")

    def layer_config(self, *, d_model: int, d_ff: int, activation: str, init_std: float, ops_backend: str) -> MoEConfig:
        """The MoEConfig of one MoE block (validates the shared fields: one source of truth)."""
        return MoEConfig(
            d_model=d_model, d_ff=d_ff, num_experts=self.num_experts, gate=self.gate, top_k=self.top_k,
            capacity_factor=self.capacity_factor, eval_capacity_factor=self.eval_capacity_factor,
            dropless=self.dropless, normalize_topk=self.normalize_topk, jitter_eps=self.jitter_eps,
            activation=activation, aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef,
            init_std=init_std, ops_backend=ops_backend,
        )


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    max_seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    moe_every: int = 2
    moe: MoESettings = field(default_factory=MoESettings)
    activation: str = "gelu"
    partition_embedding: bool = False  # split the token embedding along D over the EP group (untied head)
    dropout: float = 0.0
    init_std: float = 0.02
    ops_backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.moe_every < 0:
            raise ValueError(f"moe_every must be >= 0 (0 = dense model), got {self.moe_every}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.ops_backend not in OPS_BACKENDS:
            raise ValueError(f"ops_backend must be one of {OPS_BACKENDS}, got {self.ops_backend!r}")

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def moe_config(self) -> MoEConfig:
        return self.moe.layer_config(
            d_model=self.d_model, d_ff=self.moe.d_ff or self.d_ff, activation=self.activation,
            init_std=self.init_std, ops_backend=self.ops_backend,
        )


class KVCache(NamedTuple):
    k: paddle.Tensor  # [B, H, S_past, Dh]
    v: paddle.Tensor


class CausalSelfAttention(nn.Layer):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.d_head = cfg.d_model // cfg.n_heads
        init = nn.initializer.Normal(std=cfg.init_std)
        out_init = nn.initializer.Normal(std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, weight_attr=paddle.ParamAttr(initializer=init))
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, weight_attr=paddle.ParamAttr(initializer=out_init))
        self.dropout = cfg.dropout

    def forward(self, x_BSD: paddle.Tensor, cache: KVCache | None = None) -> tuple[paddle.Tensor, KVCache]:
        B, S, D = x_BSD.shape
        qkv = self.qkv(x_BSD).reshape([B, S, 3, self.n_heads, self.d_head]).transpose([2, 0, 3, 1, 4])
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, S, Dh]
        if cache is not None:
            k = paddle.concat([cache.k, k], axis=2)
            v = paddle.concat([cache.v, v], axis=2)
        S_all = k.shape[2]
        scores = paddle.matmul(q, k, transpose_y=True) * (1.0 / math.sqrt(self.d_head))
        # query i (absolute position S_all - S + i) sees keys 0 .. S_all - S + i
        q_pos = paddle.arange(S_all - S, S_all, dtype="int64").unsqueeze(1)
        k_pos = paddle.arange(S_all, dtype="int64").unsqueeze(0)
        scores = paddle.where(k_pos <= q_pos, scores, paddle.full_like(scores, float("-inf")))
        attn = F.softmax(scores, axis=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = paddle.matmul(attn, v).transpose([0, 2, 1, 3]).reshape([B, S, D])
        return self.proj(out), KVCache(k, v)


class DenseFFN(nn.Layer):
    """``act(x W1 + b1) W2 + b2`` through the grouped-FFN op with one group (fast CPU path)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, init_std: float, n_layers: int, backend: str):
        super().__init__()
        self.activation = activation
        self.backend = backend
        self.w1 = self.create_parameter([1, d_model, d_ff], default_initializer=nn.initializer.Normal(std=init_std))
        self.b1 = self.create_parameter([1, d_ff], default_initializer=nn.initializer.Constant(0.0))
        self.w2 = self.create_parameter(
            [1, d_ff, d_model], default_initializer=nn.initializer.Normal(std=init_std / math.sqrt(2 * n_layers))
        )
        self.b2 = self.create_parameter([1, d_model], default_initializer=nn.initializer.Constant(0.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        shape = x.shape
        x_TD = x.reshape([-1, shape[-1]])
        counts = paddle.to_tensor([x_TD.shape[0]], dtype="int32")
        y = ops.grouped_ffn(x_TD, counts, self.w1, self.b1, self.w2, self.b2, activation=self.activation, backend=self.backend)
        return y.reshape(shape)


class BlockOutput(NamedTuple):
    x: paddle.Tensor
    cache: KVCache
    aux_loss: paddle.Tensor | None
    stats: RoutingStats | None


class Block(nn.Layer):
    def __init__(self, cfg: GPTConfig, layer_idx: int, moe_exchange=None, ep_size: int = 1, recompute_moe: bool = False):
        super().__init__()
        self.recompute_moe = recompute_moe
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.dropout = cfg.dropout
        if self.is_moe:
            self.ffn = MoELayer(cfg.moe_config(), exchange=moe_exchange, ep_size=ep_size)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, cfg.init_std, cfg.n_layers, cfg.ops_backend)

    def forward(self, x: paddle.Tensor, cache: KVCache | None = None) -> BlockOutput:
        a, new_cache = self.attn(self.ln1(x), cache)
        if self.training and self.dropout > 0:
            a = F.dropout(a, self.dropout)
        x = x + a
        h = self.ln2(x)
        if self.is_moe:
            if self.recompute_moe and self.training:
                return self._moe_recomputed(x, h, new_cache)
            out = self.ffn(h)
            return BlockOutput(x + out.y, new_cache, out.aux_loss, out.stats)
        return BlockOutput(x + self.ffn(h), new_cache, None, None)

    def _moe_recomputed(self, x: paddle.Tensor, h: paddle.Tensor, cache: KVCache) -> BlockOutput:
        """MoE FFN under activation recomputation: its activations are rebuilt in the backward
        pass (RNG state preserved, so gate noise repeats exactly) instead of being kept."""
        from paddle.distributed.fleet.utils import recompute

        y, aux, demand, kept, dropped = recompute(_flat_moe, self.ffn, h)
        return BlockOutput(x + y, cache, aux, RoutingStats(demand, kept, dropped))


def _flat_moe(ffn: MoELayer, h: paddle.Tensor):
    out = ffn(h)
    return out.y, out.aux_loss, out.stats.demand, out.stats.kept, out.stats.dropped_fraction


class GPTOutput(NamedTuple):
    logits: paddle.Tensor  # [B, S, V]
    loss: paddle.Tensor | None  # lm_loss + aux_loss (training objective), when targets given
    lm_loss: paddle.Tensor | None  # mean token cross-entropy (nats)
    aux_loss: paddle.Tensor  # sum of the MoE layers' weighted aux losses
    moe_stats: list[RoutingStats]  # one per MoE layer, in layer order
    caches: list[KVCache]


class GPTMoE(nn.Layer):
    """Decoder LM. ``forward(tokens[B, S] int64, targets[B, S] int64 | None, caches)``."""

    def __init__(self, cfg: GPTConfig, moe_exchange=None, ep_size: int = 1, recompute_moe: bool = False):
        super().__init__()
        self.config = cfg
        init = nn.initializer.Normal(std=cfg.init_std)
        if cfg.partition_embedding:
            from paddle_semoe.comm.topology import CommGroup
            from paddle_semoe.models.embedding import PartitionedEmbedding

            group = moe_exchange.topology.ep_group if moe_exchange is not None else CommGroup.solo("ep")
            comm = moe_exchange.comm if moe_exchange is not None else None
            self.tok_emb = PartitionedEmbedding(cfg.vocab_size, cfg.d_model, comm, group, cfg.init_std)
            # the output projection needs the whole table: with a partitioned input table it is its own
            self.lm_head = self.create_parameter([cfg.vocab_size, cfg.d_model], default_initializer=init)
        else:
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, weight_attr=paddle.ParamAttr(initializer=init))
            self.lm_head = None
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model, weight_attr=paddle.ParamAttr(initializer=init))
        self.blocks = nn.LayerList([Block(cfg, i, moe_exchange, ep_size, recompute_moe) for i in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def embed(self, tokens: paddle.Tensor, past: int = 0) -> paddle.Tensor:
        B, S = tokens.shape
        if isinstance(S, int) and past + S > self.config.max_seq_len:  # S is symbolic when traced
            raise ValueError(f"sequence length {past + S} exceeds max_seq_len={self.config.max_seq_len}")
        pos = paddle.arange(past, past + S, dtype="int64").unsqueeze(0)
        return self.tok_emb(tokens) + self.pos_emb(pos)

    def head(self, x: paddle.Tensor) -> paddle.Tensor:
        table = self.lm_head if self.lm_head is not None else self.tok_emb.weight
        return paddle.matmul(self.ln_f(x), table, transpose_y=True)

    def forward(
        self,
        tokens: paddle.Tensor,
        targets: paddle.Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> GPTOutput:
        past = caches[0].k.shape[2] if caches else 0
        x = self.embed(tokens, past)
        aux = paddle.zeros([], dtype="float32")
        stats: list[RoutingStats] = []
        new_caches: list[KVCache] = []
        for i, block in enumerate(self.blocks):
            out = block(x, caches[i] if caches else None)
            x = out.x
            new_caches.append(out.cache)
            if out.aux_loss is not None:
                aux = aux + out.aux_loss
                stats.append(out.stats)
        logits = self.head(x)
        lm_loss = loss = None
        if targets is not None:
            lm_loss = F.cross_entropy(logits.reshape([-1, logits.shape[-1]]), targets.reshape([-1]))
            loss = lm_loss + aux
        return GPTOutput(logits, loss, lm_loss, aux, stats, new_caches)
