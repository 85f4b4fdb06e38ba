"""A GPT-style decoder language model with an MoE FFN every ``moe_every`` layers.

Pre-LayerNorm blocks ``x + attn(ln(x))``, ``x + ffn(ln(x))``; the FFN of block i is an
:class:`~paddle_semoe.moe.MoELayer` when ``(i + 1) % moe_every == 0`` (``moe_every = 0``:
a dense model), else a dense FFN. Learned positions, tied input/output embeddings.
Attention supports an incremental key/value cache for generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute

from paddle_semoe import ops
from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.comm.transport import Communicator
from paddle_semoe.models.embedding import PartitionedEmbedding
from paddle_semoe.moe import MoEConfig, MoELayer, MoESettings, RoutingStats
from paddle_semoe.moe.config import ACTIVATIONS, OPS_BACKENDS
from paddle_semoe.moe.layer import ExpertExchange


@dataclass(frozen=True)
class GPTConfig:
    """The language model (YAML section ``model``); ``moe`` holds the settings every MoE block
    shares, and :meth:`moe_config` adds the model's widths, activation, init and ops backend."""

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
        if self.moe.router == "expert_choice":
            raise ValueError("model.moe.router=expert_choice is not causal (a token's experts depend on later tokens); the GPT decoder needs a token-choice router")
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
        """The config of every MoE block: ``moe`` with the model's widths, activation, init and backend."""
        return self.moe.layer(
            d_model=self.d_model, d_ff=self.d_ff, activation=self.activation,
            init_std=self.init_std, ops_backend=self.ops_backend,
        )


class KVCache(NamedTuple):
    k: paddle.Tensor  # [B, H, S_past, Dh]
    v: paddle.Tensor


class CausalSelfAttention(nn.Layer):
    """Multi-head causal self-attention: qkv projection, attention, output projection.

    On the compiled backend (``ops_backend`` auto/custom, CPU float32) the projections are
    :func:`ops.fused_linear` (oneDNN GEMM, bias in the epilogue) and the attention is one
    :func:`ops.causal_attention` call on the qkv output (no head transposes, no [S, S] buffer
    kept for the backward). Attention-probability dropout while training uses Paddle's ops.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.d_head = cfg.d_model // cfg.n_heads
        self.backend = cfg.ops_backend
        init = nn.initializer.Normal(std=cfg.init_std)
        out_init = nn.initializer.Normal(std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, weight_attr=paddle.ParamAttr(initializer=init))
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, weight_attr=paddle.ParamAttr(initializer=out_init))
        self.dropout = cfg.dropout

    def forward(self, x_BSD: paddle.Tensor, cache: KVCache | None = None) -> tuple[paddle.Tensor, KVCache]:
        if self.training and self.dropout > 0:
            return self._forward_with_dropout(x_BSD, cache)
        qkv = ops.fused_linear(x_BSD, self.qkv.weight, self.qkv.bias, backend=self.backend)  # [B, S, 3D]
        past_k, past_v = (cache.k, cache.v) if cache is not None else (None, None)
        out = ops.causal_attention(qkv, self.n_heads, k_past=past_k, v_past=past_v, backend=self.backend)
        y = ops.fused_linear(out, self.proj.weight, self.proj.bias, backend=self.backend)
        return y, self._extend(cache, qkv)

    def _extend(self, cache: KVCache | None, qkv: paddle.Tensor) -> KVCache:
        """``cache`` (None: empty) followed by the keys and values of ``qkv [B, S, 3D]``, as
        heads-major ``[B, H, S, Dh]`` views (no gradient flows through a cache)."""
        kv = qkv.detach().reshape([0, 0, 3, self.n_heads, self.d_head]).transpose([2, 0, 3, 1, 4])
        if cache is None:
            return KVCache(kv[1], kv[2])
        return KVCache(paddle.concat([cache.k, kv[1]], axis=2),
                       paddle.concat([cache.v, kv[2]], axis=2))

    def forward_many(self, x_B1D: paddle.Tensor, caches: list[KVCache]) -> tuple[paddle.Tensor, list[KVCache]]:
        """One decode token for each of B sequences with caches of different lengths (no padding):
        the qkv and output projections run once over the batch; only the attention over each
        sequence's own cache runs per sequence. Row b of the result equals
        ``forward(x_B1D[b:b+1], caches[b])``. Inference only (no dropout).

        Args:
            x_B1D: ``float32 [B, 1, D]``.
            caches: B caches, ``caches[b].k/v`` ``[1, H, P_b, Dh]``.
        Returns:
            ``([B, 1, D], B new caches with P_b + 1 positions)``.
        """
        B = x_B1D.shape[0]
        if len(caches) != B:
            raise ValueError(f"forward_many: {B} tokens but {len(caches)} caches")
        qkv = ops.fused_linear(x_B1D, self.qkv.weight, self.qkv.bias, backend=self.backend)  # [B, 1, 3D]
        outs = [
            ops.causal_attention(qkv[b : b + 1], self.n_heads, k_past=c.k, v_past=c.v,
                                 backend=self.backend)
            for b, c in enumerate(caches)
        ]
        y = ops.fused_linear(paddle.concat(outs, axis=0), self.proj.weight, self.proj.bias, backend=self.backend)
        return y, [self._extend(c, qkv[b : b + 1]) for b, c in enumerate(caches)]

    def _forward_with_dropout(self, x_BSD: paddle.Tensor, cache: KVCache | None) -> tuple[paddle.Tensor, KVCache]:
        """Paddle's unfused ops: dropout on the attention probabilities needs them materialized."""
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
        attn = F.dropout(F.softmax(scores, axis=-1), self.dropout)
        out = paddle.matmul(attn, v).transpose([0, 2, 1, 3]).reshape([B, S, D])
        return self.proj(out), KVCache(k, v)


class FusedLayerNorm(nn.Layer):
    """LayerNorm over the last dim through :func:`ops.layer_norm` (compiled CPU kernel, or
    Paddle's layer_norm on the reference backend / a GPU). Parameters ``weight`` and ``bias``
    as in ``nn.LayerNorm``, so checkpoints are interchangeable."""

    def __init__(self, d_model: int, backend: str, epsilon: float = 1e-5):
        super().__init__()
        self.backend = backend
        self.epsilon = epsilon
        self.weight = self.create_parameter([d_model], default_initializer=nn.initializer.Constant(1.0))
        self.bias = self.create_parameter([d_model], is_bias=True, default_initializer=nn.initializer.Constant(0.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, epsilon=self.epsilon, backend=self.backend)

    def add_norm(self, x: paddle.Tensor, residual: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """``(layer_norm(x + residual), x + residual)`` in one fused pass."""
        return ops.add_layer_norm(x, residual, self.weight, self.bias, epsilon=self.epsilon, backend=self.backend)


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
        counts = paddle.full([1], x_TD.shape[0], dtype="int32")
        y = ops.grouped_ffn(x_TD, counts, self.w1, self.b1, self.w2, self.b2, activation=self.activation, backend=self.backend)
        return y.reshape(shape)


class BlockOutput(NamedTuple):
    x: paddle.Tensor
    cache: KVCache
    aux_loss: paddle.Tensor | None
    stats: RoutingStats | None


class DeferredBlockOutput(NamedTuple):
    """A block's output with its last residual add pending: the block output is ``x + delta``."""

    x: paddle.Tensor
    delta: paddle.Tensor
    cache: KVCache
    aux_loss: paddle.Tensor | None
    stats: RoutingStats | None


@dataclass(frozen=True)
class ExpertParallel:
    """The expert-parallel context a model is built with (passed explicitly, never read off
    the exchange).

    Attributes:
        group: this rank's expert-parallel group; its size is the EP degree.
        exchange: moves expert-major rows between the group's ranks (every MoE layer).
        comm: host collectives over ``group`` (the partitioned embedding's row exchange);
            None for a model that is only built, never run (planning).
    """

    group: CommGroup
    exchange: ExpertExchange[Any]
    comm: Communicator | None = None

    def __post_init__(self) -> None:
        if self.exchange.ep_degree != self.group.size:
            raise ValueError(
                f"the exchange spans ep_degree={self.exchange.ep_degree} ranks but the group "
                f"{self.group.describe()} has {self.group.size}"
            )

    @property
    def size(self) -> int:
        return self.group.size


class Block(nn.Layer):
    """Pre-LayerNorm block. The pieces :meth:`attend` and ``ln2`` + ``ffn`` are what the
    training forward, the serving runner and the exported static graphs all run."""

    def __init__(
        self, cfg: GPTConfig, layer_idx: int, exchange: ExpertExchange[Any] | None = None, recompute_moe: bool = False
    ):
        super().__init__()
        self.recompute_moe = recompute_moe
        self.ln1 = FusedLayerNorm(cfg.d_model, cfg.ops_backend)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = FusedLayerNorm(cfg.d_model, cfg.ops_backend)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.dropout = cfg.dropout
        self.ffn: MoELayer | DenseFFN
        if self.is_moe:
            self.ffn = MoELayer(cfg.moe_config(), exchange=exchange)
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, cfg.init_std, cfg.n_layers, cfg.ops_backend)

    def attend(self, x: paddle.Tensor, cache: KVCache | None = None) -> tuple[paddle.Tensor, KVCache]:
        """``x + attn(ln1(x))`` (dropout while training) for ``x [B, S, D]``, and the new cache."""
        a, new_cache = self.attn(self.ln1(x), cache)
        if self.training and self.dropout > 0:
            a = F.dropout(a, self.dropout)
        return x + a, new_cache

    def attend_many(self, x_B1D: paddle.Tensor, caches: list[KVCache]) -> tuple[paddle.Tensor, list[KVCache]]:
        """:meth:`attend` for one decode token of each of B sequences, each with its own cache
        (see :meth:`CausalSelfAttention.forward_many`). Inference only."""
        a, new_caches = self.attn.forward_many(self.ln1(x_B1D), caches)
        return x_B1D + a, new_caches

    def forward(
        self, x: paddle.Tensor, cache: KVCache | None = None, delta: paddle.Tensor | None = None,
        deferred: bool = False,
    ) -> BlockOutput | DeferredBlockOutput:
        """``x + attn(ln1(x))`` then ``+ ffn(ln2(.))`` for ``x [B, S, D]`` (of ``x + delta`` when
        ``delta`` is given). ``deferred=True`` returns :meth:`forward_deferred`'s output instead:
        the training forward calls its blocks this way, through the layer, so that forward
        pre-hooks on a block run (``storage.shard_dense`` waits there for the block's gather)."""
        out = self.forward_deferred(x, delta, cache)
        if deferred:
            return out
        return BlockOutput(out.x + out.delta, out.cache, out.aux_loss, out.stats)

    def forward_deferred(
        self, x: paddle.Tensor, delta: paddle.Tensor | None, cache: KVCache | None = None
    ) -> DeferredBlockOutput:
        """:meth:`forward` of ``x + delta`` (``delta`` None: of ``x``) with the residual adds left
        to the LayerNorms: the incoming add fused into ``ln1``, the attention's into ``ln2`` (one
        pass each, no gradient accumulation on the residual stream), and the FFN's returned
        pending: the block's output is ``out.x + out.delta``, for the next block's ``ln1`` to fuse.
        The same numbers as ``x = attend(x + delta); x + ffn(ln2(x))``, which serving and export
        run (a fused add-LayerNorm computes the sum, then the LayerNorm of it).

        Args:
            x: ``float32 [B, S, D]`` residual stream.
            delta: ``float32 [B, S, D]`` pending residual add from the previous block, or None.
            cache: this layer's key/value cache, or None.
        """
        if delta is None:
            h1 = self.ln1(x)
        else:
            h1, x = self.ln1.add_norm(delta, x)
        a, new_cache = self.attn(h1, cache)
        if self.training and self.dropout > 0:
            a = F.dropout(a, self.dropout)
        h, x = self.ln2.add_norm(a, x)
        if isinstance(self.ffn, DenseFFN):
            return DeferredBlockOutput(x, self.ffn(h), new_cache, None, None)
        if self.recompute_moe and self.training:
            return self._moe_recomputed(x, h, new_cache)
        out = self.ffn(h)
        return DeferredBlockOutput(x, out.y, new_cache, out.aux_loss, out.stats)

    def _moe_recomputed(self, x: paddle.Tensor, h: paddle.Tensor, cache: KVCache) -> DeferredBlockOutput:
        """MoE FFN under activation recomputation: its activations are rebuilt in the backward
        pass (RNG state preserved, so gate noise repeats exactly) instead of being kept."""
        y, aux, demand, kept, dropped = recompute(_flat_moe, self.ffn, h)
        return DeferredBlockOutput(x, y, cache, aux, RoutingStats(demand, kept, dropped))


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
    """Decoder LM. ``forward(tokens[B, S] int64, targets[B, S] int64 | None, caches)``.

    Args:
        cfg: the model config.
        parallel: the expert-parallel context (group, exchange, communicator), or None for a
            single rank holding every expert.
        recompute_moe: rebuild the MoE activations in the backward pass.
    """

    def __init__(self, cfg: GPTConfig, parallel: ExpertParallel | None = None, recompute_moe: bool = False):
        super().__init__()
        self.config = cfg
        init = nn.initializer.Normal(std=cfg.init_std)
        self.tok_emb: PartitionedEmbedding | nn.Embedding
        self.lm_head: paddle.Tensor | None
        if cfg.partition_embedding:
            group = parallel.group if parallel is not None else CommGroup.solo("ep")
            comm = parallel.comm if parallel is not None else None
            self.tok_emb = PartitionedEmbedding(cfg.vocab_size, cfg.d_model, comm, group, cfg.init_std)
            # the output projection needs the whole table: with a partitioned input table it is its own
            self.lm_head = self.create_parameter([cfg.vocab_size, cfg.d_model], default_initializer=init)
        else:
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, weight_attr=paddle.ParamAttr(initializer=init))
            self.lm_head = None
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model, weight_attr=paddle.ParamAttr(initializer=init))
        exchange = parallel.exchange if parallel is not None else None
        self.blocks = nn.LayerList([Block(cfg, i, exchange, recompute_moe) for i in range(cfg.n_layers)])
        self.ln_f = FusedLayerNorm(cfg.d_model, cfg.ops_backend)

    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFNs in block order."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def set_eval_dropless(self, enabled: bool) -> None:
        """Serving: route every MoE layer without capacity while not training (see MoELayer)."""
        for layer in self.moe_layers():
            layer.eval_dropless = enabled

    def set_serving(self, enabled: bool) -> None:
        """Serving: dropless routing, and outside training under ``no_grad`` the MoE layers skip
        their losses and routing statistics (``moe_stats`` stays empty, ``aux_loss`` is 0)."""
        self.set_eval_dropless(enabled)
        for layer in self.moe_layers():
            layer.serving = enabled

    def embed(self, tokens: paddle.Tensor, past: int | paddle.Tensor = 0) -> paddle.Tensor:
        """Token + position embeddings of ``tokens`` int64 [B, S] at positions ``past ..
        past + S - 1`` (``past``: an int, or a 0-D int64 tensor in an exported graph)."""
        tok, pos = self.embed_parts(tokens, past, per_row=False)
        return tok + pos

    def embed_parts(
        self, tokens: paddle.Tensor, past: int | paddle.Tensor = 0, per_row: bool = True
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """The two terms of :meth:`embed`: token embeddings ``[B, S, D]`` and position
        embeddings, ``[B, S, D]`` (``per_row``: looked up for every row, so the sum can join the
        first LayerNorm's fused add and its gradient is the lookup's scatter-add, with no
        broadcast reduction) or ``[1, S, D]``."""
        B, S = tokens.shape
        if isinstance(S, int) and isinstance(past, int) and past + S > self.config.max_seq_len:  # S is symbolic when traced
            raise ValueError(f"sequence length {past + S} exceeds max_seq_len={self.config.max_seq_len}")
        pos = paddle.arange(past, past + S, dtype="int64").unsqueeze(0)
        if per_row:
            pos = pos.expand([B, S])
        return self.tok_emb(tokens), self.pos_emb(pos)

    def head(self, x: paddle.Tensor) -> paddle.Tensor:
        table = self.lm_head if self.lm_head is not None else self.tok_emb.weight
        return ops.fused_linear(self.ln_f(x), table, trans_w=True, backend=self.config.ops_backend)

    def forward(
        self,
        tokens: paddle.Tensor,
        targets: paddle.Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> GPTOutput:
        past = caches[0].k.shape[2] if caches else 0
        # token + position embeddings: their sum joins the first block's ln1 (fused add)
        x, delta = self.embed_parts(tokens, past)
        aux = paddle.zeros([], dtype="float32")
        stats: list[RoutingStats] = []
        new_caches: list[KVCache] = []
        # each block's last residual add is fused into the next block's ln1 (Block.forward_deferred)
        for i, block in enumerate(self.blocks):
            out = block(x, caches[i] if caches else None, delta=delta, deferred=True)
            assert isinstance(out, DeferredBlockOutput)
            x, delta = out.x, out.delta
            new_caches.append(out.cache)
            if out.aux_loss is not None and out.stats is not None:
                aux = aux + out.aux_loss
                stats.append(out.stats)
        logits = self.head(x + delta)  # the last add stays a plain one: head(x) is what serving runs
        lm_loss = loss = None
        if targets is not None:
            lm_loss = ops.softmax_cross_entropy(
                logits.reshape([-1, logits.shape[-1]]), targets.reshape([-1]), backend=self.config.ops_backend
            )
            loss = lm_loss + aux
        return GPTOutput(logits, loss, lm_loss, aux, stats, new_caches)
