"""A UFO-style multi-task vision MoE: a shared ViT backbone whose MoE blocks hold one expert per
task plus a shared expert, routed by task.

* Patch embedding (non-overlapping ``patch_size`` patches, a linear map), a CLS token plus a
  learned per-task token, learned positions; pre-LayerNorm blocks ``x + attn(ln(x))``,
  ``x + ffn(ln(x))`` with bidirectional multi-head attention.
* Every ``moe_every``-th block's FFN is an MoE block of the kind ``moe_router`` names:
  ``task`` (default), a :class:`TaskMoE`: the shared expert and the expert of
  each task this rank hosts. No learned gate over experts: a token of task ``t`` can only go to
  task ``t``'s expert or to the shared expert. The choice between the two is learned per token
  by a small per-task gate (2 logits) and is *hard* with a straight-through gradient: the token
  goes to the arg-max, and its output is multiplied by ``1 + p - stop_gradient(p)`` (value 1,
  gradient of the chosen probability ``p``).
  ``expert_choice``, an :class:`ExpertChoiceMoE`: a pool of ``num_experts`` experts shared by
  every task, each taking its top-c tokens of every image (Zhou et al. 2022; not causal, which
  this encoder allows).
* One classification head (LayerNorm + linear) per task on the CLS token.

Parameters of task ``t`` (its experts, gates, token and head) are tagged with
:func:`~paddle_semoe.params.mark_task_params` and exist only on ranks hosting ``t``;
everything else is shared. Parameter names contain task *names*, never rank-local indices, and
:func:`init_by_name` draws every weight from ``(seed, name)``: a model built for any subset of
tasks holds bit-identical copies of those tasks' parameters (what elastic re-planning needs).
Expert FFNs run through ``paddle_semoe.ops.grouped_ffn`` over task-routed (or expert-chosen)
rows (:mod:`paddle_semoe.models.task_route`) and come back through ``ops.combine``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from paddle_semoe import ops
from paddle_semoe.ops import reference
from paddle_semoe.moe.config import ACTIVATIONS, OPS_BACKENDS, MoEConfig, check_one_of
from paddle_semoe.moe.routers import ExpertChoiceRouter
from paddle_semoe.models.task_route import local_expert_ids, task_route
from paddle_semoe.params import mark_params, mark_task_params

__all__ = ["UFO_ROUTERS", "ExpertChoiceMoE", "ExpertChoiceRouting", "TaskHead", "TaskMoE", "UFOConfig", "UFOModel", "UFOOutput", "init_by_name"]

#: MoE block kinds of ``UFOConfig.moe_router``.
UFO_ROUTERS: tuple[str, ...] = ("task", "expert_choice")


@dataclass(frozen=True)
class UFOConfig:
    """Backbone and expert sizes (YAML section ``model`` of the UFO example). ``moe_router``
    picks the MoE block: ``task`` (:class:`TaskMoE`) or ``expert_choice``
    (:class:`ExpertChoiceMoE`, sized by ``num_experts``, ``top_k``, ``capacity_factor``)."""

    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 128
    moe_every: int = 2  # every k-th block's FFN is a task MoE; 0: dense model
    expert_d_ff: int | None = None  # None: d_ff
    activation: str = "gelu"
    init_std: float = 0.02
    ops_backend: str = "auto"
    moe_router: str = "task"  # one of UFO_ROUTERS
    num_experts: int = 4  # expert_choice: experts in the pool
    top_k: int = 1  # expert_choice: average experts per token (sets c)
    capacity_factor: float = 1.0  # expert_choice: c = min(S, ceil(cf * S * top_k / num_experts))

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "d_model", "n_layers", "n_heads",
                     "d_ff", "init_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide image_size={self.image_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.moe_every < 0:
            raise ValueError(f"moe_every must be >= 0 (0 = dense), got {self.moe_every}")
        if self.expert_d_ff is not None and self.expert_d_ff <= 0:
            raise ValueError(f"expert_d_ff must be positive, got {self.expert_d_ff}")
        check_one_of(self, "activation", ACTIVATIONS)
        check_one_of(self, "ops_backend", OPS_BACKENDS)
        check_one_of(self, "moe_router", UFO_ROUTERS)
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.num_patches + 1  # + CLS

    def is_moe_block(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    @property
    def expert_capacity(self) -> int:
        """``expert_choice``: tokens each expert takes from each image (``S = seq_len``),
        ``c = min(S, ceil(capacity_factor * S * top_k / num_experts))``."""
        return min(self.seq_len, ops.expert_capacity(self.seq_len, self.num_experts, self.top_k, self.capacity_factor))

    def flops_per_sample(self, num_classes: int = 10) -> float:
        """Forward + backward FLOPs of one image (3x the forward's multiply-adds x 2)."""
        S, D = self.seq_len, self.d_model
        patch = 2 * self.num_patches * self.channels * self.patch_size**2 * D
        per_block = 2 * S * D * 3 * D + 2 * 2 * S * S * D + 2 * S * D * D
        ffn_dense = 2 * 2 * S * D * self.d_ff
        if self.moe_router == "expert_choice":  # num_experts * c rows per image, plus the router
            ffn_moe = 2 * 2 * self.num_experts * self.expert_capacity * D * (self.expert_d_ff or self.d_ff)
            ffn_moe += 2 * S * D * self.num_experts
        else:
            ffn_moe = 2 * 2 * S * D * (self.expert_d_ff or self.d_ff) + 2 * S * D * 2
        total = patch + 2 * D * num_classes
        for i in range(self.n_layers):
            total += per_block + (ffn_moe if self.is_moe_block(i) else ffn_dense)
        return 3.0 * total


@dataclass(frozen=True)
class TaskHead:
    """A task as the model sees it: its name and number of classes."""

    name: str
    num_classes: int


class _FFNWeights(nn.Layer):
    """One two-layer FFN's weights: w1 [D, F], b1 [F], w2 [F, D], b2 [D]."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = self.create_parameter([d_model, d_ff])
        self.b1 = self.create_parameter([d_ff], is_bias=True)
        self.w2 = self.create_parameter([d_ff, d_model])
        self.b2 = self.create_parameter([d_model], is_bias=True)
        mark_params([self.w1, self.b1, self.w2, self.b2], "expert")


def _grouped_ffn(
    experts: Sequence[_FFNWeights], rows_RD: paddle.Tensor, counts_E: paddle.Tensor,
    activation: str, backend: str | None,
) -> paddle.Tensor:
    """``ops.grouped_ffn`` of expert-major rows [R, D] (int32 counts [E]) over ``experts``."""
    weights = [paddle.stack([getattr(e, w) for e in experts]) for w in ("w1", "b1", "w2", "b2")]
    return ops.grouped_ffn(rows_RD, counts_E, *weights, activation=activation, backend=backend)


class TaskMoE(nn.Layer):
    """Shared expert + one expert per hosted task, task-routed, hard straight-through choice.

    Args:
        d_model, d_ff: sizes; ``hosted``: global task indices hosted here; ``names``: all task
        names (by global index).
    """

    def __init__(self, d_model: int, d_ff: int, hosted: Sequence[int], names: Sequence[str], activation: str, backend: str | None):
        super().__init__()
        self.hosted = tuple(hosted)
        self.activation = activation
        self.backend = backend
        self.shared = _FFNWeights(d_model, d_ff)
        self.experts = nn.LayerDict()
        self.gates = nn.LayerDict()
        for t in self.hosted:
            expert = _FFNWeights(d_model, d_ff)
            gate = nn.Linear(d_model, 2)
            mark_task_params(expert.parameters() + gate.parameters(), t)
            self.experts[names[t]] = expert
            self.gates[names[t]] = gate
        self._names = [names[t] for t in self.hosted]

    def forward(self, x_TD: paddle.Tensor, task_local_T: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """x [T, D] float32, task_local int32 [T] (index into ``hosted``) ->
        (y [T, D], use_task bool [T])."""
        T, D = x_TD.shape
        H = len(self.hosted)
        if H == 0:  # a rank without tasks: everything through the shared expert
            use_task = paddle.zeros([T], dtype="bool")
            st = paddle.ones([T], dtype="float32")
        else:
            gw = paddle.concat([self.gates[n].weight for n in self._names], axis=1)  # [D, 2H]
            gb = paddle.concat([self.gates[n].bias for n in self._names], axis=0)  # [2H]
            logits = (paddle.matmul(x_TD, gw) + gb).reshape([T, H, 2])
            idx = task_local_T.astype("int64").reshape([T, 1, 1]).expand([T, 1, 2])
            probs = F.softmax(paddle.take_along_axis(logits, idx, axis=1).reshape([T, 2]), axis=-1)
            use_task = probs[:, 1] > probs[:, 0]
            chosen = paddle.where(use_task, probs[:, 1], probs[:, 0])
            st = chosen - chosen.detach() + 1.0  # value 1, gradient of the chosen probability
        experts = [self.shared] + [self.experts[n] for n in self._names]
        route = task_route(local_expert_ids(task_local_T, use_task), len(experts), backend=self.backend)
        rows = paddle.gather(x_TD, route.order)
        out = _grouped_ffn(experts, rows, route.counts, self.activation, self.backend)
        y = ops.combine(out, st.reshape([T, 1]).astype("float32"), route.positions, backend=self.backend)
        return y, use_task


class ExpertChoiceRouting(NamedTuple):
    """One batch's expert choice (R = E * N * c rows, expert-major: expert e owns rows
    ``[e * N * c, (e + 1) * N * c)``, image by image, best token first)."""

    tokens: paddle.Tensor  # int64 [R] token (flat index into the N * S tokens) of each row
    counts: paddle.Tensor  # int32 [E] rows per expert, N * c each
    positions: paddle.Tensor  # int32 [T, E] row of (token, expert), -1 where the expert did not take it
    probs: paddle.Tensor  # float32 [T, E] router scores, the combine weights


class ExpertChoiceMoE(nn.Layer):
    """A pool of E FFN experts shared by every task, expert-choice routed within each image.

    Scores ``p = softmax(x @ W)`` [T, E] come from an
    :class:`~paddle_semoe.moe.routers.ExpertChoiceRouter` (its ``gate``-tagged ``weight`` [D, E],
    float32). Within each image (the routing group, S tokens), expert e takes the c tokens with
    the highest ``p[:, e]`` (ties: the lower token index), so every expert computes exactly
    ``N * c`` rows, a token gets 0..E experts and an image's output never depends on the other
    images of its batch (elastic re-planning leaves it unchanged); the output of token t is
    ``sum_e p[t, e] * FFN_e(x_t)`` over the experts that took it, so the gradient reaches the
    router through the combine weights ``p``. The experts are shared parameters (no task tag),
    replicated on every rank like the shared expert of :class:`TaskMoE`.

    Args:
        d_model, d_ff: sizes; ``num_experts``: E; ``capacity``: c (1..S of the images it runs on);
        ``activation``, ``backend``: as for :class:`TaskMoE`; ``ops_backend``: the config's
        string (``auto`` | ``custom`` | ``reference``) for the router.
    """

    def __init__(
        self, d_model: int, d_ff: int, num_experts: int, capacity: int, activation: str, backend: str | None,
        ops_backend: str,
    ):
        super().__init__()
        if num_experts < 1 or capacity < 1:
            raise ValueError(f"ExpertChoiceMoE needs num_experts >= 1 and capacity >= 1, got {num_experts} and {capacity}")
        self.num_experts = num_experts
        self.capacity = capacity
        self.activation = activation
        self.backend = backend
        # the router's own capacity settings are unused: c is per image, given here
        self.router = ExpertChoiceRouter(
            MoEConfig(router="expert_choice", num_experts=num_experts, top_k=1, d_model=d_model, d_ff=d_ff,
                      activation=activation, ops_backend=ops_backend, aux_loss_coef=0.0, z_loss_coef=0.0)
        )
        self.experts = nn.LayerList([_FFNWeights(d_model, d_ff) for _ in range(num_experts)])

    def route(self, x_NSD: paddle.Tensor) -> ExpertChoiceRouting:
        """Scores and per-image expert choice for x [N, S, D] (no expert computation)."""
        N, S, D = x_NSD.shape
        E, c = self.num_experts, self.capacity
        if c > S:
            raise ValueError(f"ExpertChoiceMoE: capacity c={c} exceeds the {S} tokens of an image")
        T = N * S
        logits_TE, _ = self.router.scores(x_NSD.reshape([T, D]))
        probs_TE = F.softmax(logits_TE, axis=-1)
        # expert e of image n takes its c best tokens (stable sort: ties go to the lower index)
        p_NES = probs_TE.detach().reshape([N, S, E]).transpose([0, 2, 1])
        top_NEc = paddle.argsort(-p_NES, axis=-1, stable=True)[:, :, :c]
        base_N11 = (paddle.arange(N, dtype="int64") * S).reshape([N, 1, 1])
        tok_R = (top_NEc + base_N11).transpose([1, 0, 2]).reshape([E * N * c])  # expert-major rows: (e, n, j)
        # positions[t, e]: the row of (token t, expert e), -1 where e did not take t
        expert_R = paddle.arange(E, dtype="int64").reshape([E, 1]).expand([E, N * c]).reshape([E * N * c])
        positions_TE = paddle.scatter(
            paddle.full([T * E], -1, dtype="int32"), tok_R * E + expert_R, paddle.arange(E * N * c, dtype="int32")
        ).reshape([T, E])
        return ExpertChoiceRouting(tok_R, paddle.full([E], N * c, dtype="int32"), positions_TE, probs_TE)

    def forward(self, x_NSD: paddle.Tensor) -> paddle.Tensor:
        """x [N, S, D] float32 (N images of S tokens) -> y [N, S, D]."""
        N, S, D = x_NSD.shape
        r = self.route(x_NSD)
        rows_RD = paddle.gather(x_NSD.reshape([N * S, D]), r.tokens)
        out_RD = _grouped_ffn(list(self.experts), rows_RD, r.counts, self.activation, self.backend)
        y_TD = ops.combine(out_RD, r.probs, r.positions, backend=self.backend)
        return y_TD.reshape([N, S, D])


class _Attention(nn.Layer):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x_NSD: paddle.Tensor) -> paddle.Tensor:
        N, S, D = x_NSD.shape
        h, dh = self.n_heads, D // self.n_heads
        qkv = self.qkv(x_NSD).reshape([N, S, 3, h, dh]).transpose([2, 0, 3, 1, 4])  # [3, N, h, S, dh]
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = F.softmax(paddle.matmul(q, k, transpose_y=True) * (1.0 / math.sqrt(dh)), axis=-1)
        out = paddle.matmul(att, v).transpose([0, 2, 1, 3]).reshape([N, S, D])
        return self.proj(out)


class _DenseFFN(nn.Layer):
    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.activation = activation

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc2(reference.activation(self.fc1(x), self.activation))


class _Block(nn.Layer):
    def __init__(self, cfg: UFOConfig, moe: TaskMoE | ExpertChoiceMoE | None) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = _Attention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = moe
        self.ffn: _DenseFFN | None = None if moe is not None else _DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation)

    def forward(self, x_NSD: paddle.Tensor, task_local_T: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor | None]:
        x = x_NSD + self.attn(self.ln1(x_NSD))
        h = self.ln2(x)
        if self.moe is None:
            assert self.ffn is not None  # a dense block
            return x + self.ffn(h), None
        if isinstance(self.moe, ExpertChoiceMoE):
            return x + self.moe(h), None
        N, S, D = h.shape
        y, use_task = self.moe(h.reshape([N * S, D]), task_local_T)
        return x + y.reshape([N, S, D]), use_task


class UFOOutput(NamedTuple):
    cls: paddle.Tensor  # [N, D] final CLS features (before the heads)
    use_task: list[paddle.Tensor]  # per task-routed MoE block: bool [N * S], token chose its task expert


class UFOModel(nn.Layer):
    """The backbone, the task MoE blocks and the heads of the hosted tasks.

    Args:
        cfg: sizes.
        heads: every task of the job (global index = position).
        hosted: global indices of the tasks this rank runs (their parameters are built here).
    """

    def __init__(self, cfg: UFOConfig, heads: Sequence[TaskHead], hosted: Sequence[int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.task_heads = tuple(heads)
        self.hosted = tuple(sorted(hosted))
        names = [h.name for h in heads]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for t in self.hosted:
            if not 0 <= t < len(heads):
                raise ValueError(f"hosted task {t} outside [0, {len(heads)})")
        D = cfg.d_model
        backend = None if cfg.ops_backend == "auto" else cfg.ops_backend
        self.patch = nn.Linear(cfg.channels * cfg.patch_size**2, D)
        self.cls_token = self.create_parameter([D], is_bias=True)
        self.pos = self.create_parameter([cfg.seq_len, D])
        self.task_tokens = nn.LayerDict()
        self.heads = nn.LayerDict()
        for t in self.hosted:
            token = _TaskToken(D)
            head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, heads[t].num_classes))
            mark_task_params(token.parameters() + head.parameters(), t)
            self.task_tokens[names[t]] = token
            self.heads[names[t]] = head
        d_exp = cfg.expert_d_ff or cfg.d_ff

        def moe_block() -> TaskMoE | ExpertChoiceMoE:
            if cfg.moe_router == "expert_choice":
                return ExpertChoiceMoE(D, d_exp, cfg.num_experts, cfg.expert_capacity, cfg.activation, backend, cfg.ops_backend)
            return TaskMoE(D, d_exp, self.hosted, names, cfg.activation, backend)

        self.blocks = nn.LayerList([_Block(cfg, moe_block() if cfg.is_moe_block(i) else None) for i in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(D)
        self._local = {t: j for j, t in enumerate(self.hosted)}

    @property
    def num_moe_blocks(self) -> int:
        return sum(1 for i in range(self.cfg.n_layers) if self.cfg.is_moe_block(i))

    def local_index(self, task: int) -> int:
        if task not in self._local:
            raise ValueError(f"task {task} ({self.task_heads[task].name}) is not hosted here (hosted: {self.hosted})")
        return self._local[task]

    def _patches(self, images: paddle.Tensor) -> paddle.Tensor:
        c, p = self.cfg, self.cfg.patch_size
        N = images.shape[0]
        g = c.image_size // p
        x = images.reshape([N, c.channels, g, p, g, p]).transpose([0, 2, 4, 1, 3, 5])
        return x.reshape([N, g * g, c.channels * p * p])

    def forward(self, images_NCHW: paddle.Tensor, task_local_N: paddle.Tensor) -> UFOOutput:
        """images float32 [N, C, H, W]; task_local int32 [N] (index into ``hosted``)."""
        N = images_NCHW.shape[0]
        D = self.cfg.d_model
        x = self.patch(self._patches(images_NCHW))  # [N, P, D]
        if self.hosted:
            tokens = paddle.stack([self.task_tokens[self.task_heads[t].name].value for t in self.hosted])  # [H, D]
            cls = self.cls_token + paddle.gather(tokens, task_local_N.astype("int64"))  # [N, D]
        else:
            cls = self.cls_token.expand([N, D])
        x = paddle.concat([cls.unsqueeze(1), x], axis=1) + self.pos  # [N, S, D]
        S = x.shape[1]
        task_local_T = task_local_N.astype("int32").unsqueeze(1).expand([N, S]).reshape([N * S])
        uses = []
        for block in self.blocks:
            x, use = block(x, task_local_T)
            if use is not None:
                uses.append(use)
        return UFOOutput(self.ln_f(x[:, 0]), uses)

    def head(self, task: int, cls_ND: paddle.Tensor) -> paddle.Tensor:
        """Logits [N, classes] of task ``task`` (global index) from CLS features."""
        self.local_index(task)
        return self.heads[self.task_heads[task].name](cls_ND)


class _TaskToken(nn.Layer):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.value = self.create_parameter([d_model], is_bias=True)


def init_by_name(model: nn.Layer, seed: int, std: float) -> None:
    """Re-initialize every parameter from ``(seed, its structured name)`` alone.

    LayerNorm scales 1 and shifts 0; other 1-D parameters (biases, tokens) 0; matrices and the
    position table ``N(0, std)`` from a generator seeded by ``(seed, crc32(name))``.
    """
    norms = {id(p) for _, sub in model.named_sublayers() if isinstance(sub, nn.LayerNorm) for p in sub.parameters()}
    for name, p in model.named_parameters():
        if id(p) in norms:
            value = np.ones(p.shape, np.float32) if name.endswith("weight") else np.zeros(p.shape, np.float32)
        elif len(p.shape) == 1:
            value = np.zeros(p.shape, np.float32)
        else:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            value = (rng.standard_normal(p.shape) * std).astype(np.float32)
        p.set_value(value)
