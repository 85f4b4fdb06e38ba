"""Typed configuration of the MoE layers: the settings a model's MoE layers share, and one layer.

:class:`MoESettings` is the YAML section ``model.moe``: routing, capacity, losses and the
expert width, with every MoE rule and default. :class:`MoEConfig` is one layer: the same
settings (it derives from :class:`MoESettings`) with the layer's widths, activation, init and
ops backend resolved. A model builds its layers' configs with :meth:`MoESettings.layer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

GATE_KINDS: tuple[str, ...] = ("topk", "gshard", "switch")
ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "relu", "silu")
OPS_BACKENDS: tuple[str, ...] = ("auto", "custom", "reference")
DROP_POLICIES: tuple[str, ...] = ("position", "probs")
CAPACITY_ORDERS: tuple[str, ...] = ("choice", "token")
# Router kinds (the classes of paddle_semoe.moe.routers.ROUTERS) and score functions.
ROUTER_KINDS: tuple[str, ...] = ("token_choice", "aux_free", "device_limited", "expert_choice")
SCORE_FNS: tuple[str, ...] = ("softmax", "sigmoid")


def check_one_of(obj: object, name: str, choices: tuple[str, ...]) -> None:
    """``ValueError`` naming the field unless ``obj.<name>`` is one of ``choices``."""
    value = getattr(obj, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class MoESettings:
    """The MoE settings every MoE layer of a model shares (YAML section ``model.moe``).

    Attributes:
        num_experts: experts E in total (across the expert-parallel group).
        gate: ``topk`` (any k), ``gshard`` (top-2, random routing of the second expert while
            training) or ``switch`` (top-1 with multiplicative input jitter while training).
        top_k: experts per token for the ``topk`` gate (``gshard`` uses 2, ``switch`` 1).
        capacity_factor: capacity per expert = ceil(cf * T * k / E); tokens past it are
            dropped (every token's first choice before any second choice). Ignored when
            ``dropless``.
        eval_capacity_factor: the same while not training (inference usually drops less).
        min_capacity: floor on the capacity (rows per expert) when it is limited; 0 = none.
            Small batches otherwise get a capacity of one or two rows.
        drop_policy: which assignments an overflowing expert keeps. ``position``: by position
            in the priority order of ``capacity_order``; ``probs``: its highest-probability
            assignments (ties by token index).
        capacity_order: the priority order of ``position``. ``choice`` (default; GShard,
            DeepSpeed, Tutel, Megatron-Core): every token's j-th choice before any token's
            (j+1)-th, token order within a choice. ``token``: (token, choice) order, the rule
            of earlier versions, which lets a token's second choice take the slot of a later
            token's first choice; kept only as a baseline for comparisons.
        batch_priority: V-MoE batch prioritized routing (``position`` only): tokens are taken
            in order of their top router probability (descending, ties by token index)
            instead of their order in the batch.
        router: ``token_choice`` (each token its top-k), ``aux_free`` (DeepSeek-V3 balance bias
            on the selection, updated after each step), ``device_limited`` (DeepSeek-V2: a
            token's experts from at most ``device_limit`` of ``device_groups`` expert groups)
            or ``expert_choice`` (each expert its top-c tokens; not causal). See
            :mod:`paddle_semoe.moe.routers`.
        score_fn: ``softmax`` over a token's experts or ``sigmoid`` per expert (DeepSeek-V3;
            with ``normalize_topk`` the selected scores are renormalized to sum to 1).
        bias_update_rate: ``aux_free`` step: ``bias += rate * sign(mean_load - load)``.
        device_groups: ``device_limited``: contiguous expert groups (set it to the expert-
            parallel degree so the limit bounds the all-to-all fan-out); must divide E.
        device_limit: ``device_limited``: groups a token may use (M), 1..device_groups.
        num_shared_experts: always-on experts computed for every token beside the routed ones
            and added to their output (DeepSeekMoE); replicated like dense parameters.
        shared_d_ff: hidden width of each shared expert; ``None`` = the routed experts' width.
        dropless: no capacity limit; every routed token is computed.
        normalize_topk: divide the k selected probabilities by their sum. ``None`` picks the
            gate's convention: true for topk with k > 1 and gshard, false for switch.
        jitter_eps: switch gate input jitter, x * U(1 - eps, 1 + eps) on the router input.
        d_ff: expert FFN hidden width F; ``None`` here means the model's dense FFN width
            (:meth:`layer` resolves it; a :class:`MoEConfig` always has it).
        aux_loss_coef: weight of the load-balance loss in ``MoEOutput.aux_loss``.
        z_loss_coef: weight of the router z-loss in ``MoEOutput.aux_loss``.
    """

    num_experts: int = 8
    gate: str = "topk"
    top_k: int = 2
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 0
    drop_policy: str = "position"
    capacity_order: str = "choice"
    batch_priority: bool = False
    router: str = "token_choice"
    score_fn: str = "softmax"
    bias_update_rate: float = 1e-3
    device_groups: int = 0
    device_limit: int = 0
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    dropless: bool = False
    normalize_topk: bool | None = None
    jitter_eps: float = 0.01
    d_ff: int | None = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001

    def __post_init__(self) -> None:
        if self.num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {self.num_experts}")
        if self.d_ff is not None and self.d_ff <= 0:
            raise ValueError(f"d_ff must be positive, got {self.d_ff}")
        check_one_of(self, "gate", GATE_KINDS)
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.k} (gate={self.gate})"
            )
        if self.gate == "gshard" and self.num_experts < 2:
            raise ValueError("gate 'gshard' routes to 2 experts: num_experts must be >= 2")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if not self.dropless and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 unless dropless=true, got {getattr(self, name)}")
        if not 0 <= self.jitter_eps < 1:
            raise ValueError(f"jitter_eps must be in [0, 1), got {self.jitter_eps}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        check_one_of(self, "drop_policy", DROP_POLICIES)
        check_one_of(self, "capacity_order", CAPACITY_ORDERS)
        if self.drop_policy == "probs" and (self.batch_priority or self.capacity_order != "choice"):
            raise ValueError("batch_priority and capacity_order apply to drop_policy=position, not to drop_policy=probs")
        self._check_router()
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ValueError("aux_loss_coef and z_loss_coef must be >= 0")

    @property
    def k(self) -> int:
        """Experts per token after the gate's convention."""
        return {"gshard": 2, "switch": 1}.get(self.gate, self.top_k)

    @property
    def normalize(self) -> bool:
        """Whether the k selected probabilities are divided by their sum (see ``normalize_topk``)."""
        if self.normalize_topk is not None:
            return self.normalize_topk
        return self.gate == "gshard" or (self.gate == "topk" and self.k > 1)

    def _check_router(self) -> None:
        check_one_of(self, "router", ROUTER_KINDS)
        check_one_of(self, "score_fn", SCORE_FNS)
        if self.router == "aux_free" and not self.bias_update_rate > 0:
            raise ValueError(f"bias_update_rate must be > 0 for router=aux_free, got {self.bias_update_rate}")
        if self.router == "device_limited":
            G, M, E = self.device_groups, self.device_limit, self.num_experts
            if G < 1 or E % G:
                raise ValueError(f"device_groups must be >= 1 and divide num_experts={E} for router=device_limited, got {G}")
            if not 1 <= M <= G or M * (E // G) < self.k:
                raise ValueError(
                    f"device_limit must be in [1, device_groups={G}] and give >= top_k={self.k} experts "
                    f"({E // G} per group), got {M}"
                )
        if self.router == "expert_choice" and self.gate != "topk":
            raise ValueError(f"router=expert_choice needs gate=topk (top_k sets the capacity), got gate={self.gate!r}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_d_ff is not None and self.shared_d_ff <= 0:
            raise ValueError(f"shared_d_ff must be positive, got {self.shared_d_ff}")

    @property
    def capacity_rule(self) -> str:
        """The dispatch op's capacity rule: ``choice``, ``token`` or ``probs``."""
        return "probs" if self.drop_policy == "probs" else self.capacity_order

    def capacity_factor_for(self, training: bool) -> float:
        """Effective capacity factor; <= 0 means dropless."""
        if self.dropless:
            return 0.0
        return self.capacity_factor if training else self.eval_capacity_factor

    def layer(
        self, *, d_model: int, d_ff: int, activation: str = "gelu", init_std: float = 0.02, ops_backend: str = "auto"
    ) -> MoEConfig:
        """The :class:`MoEConfig` of one layer with these settings.

        Args:
            d_model: token width D.
            d_ff: the model's dense FFN width, the expert width when ``self.d_ff`` is ``None``.
            activation, init_std, ops_backend: as in :class:`MoEConfig`.
        """
        shared = {f.name: getattr(self, f.name) for f in fields(MoESettings)}
        shared["d_ff"] = d_ff if self.d_ff is None else self.d_ff
        return MoEConfig(**shared, d_model=d_model, activation=activation, init_std=init_std, ops_backend=ops_backend)


@dataclass(frozen=True, kw_only=True)
class MoEConfig(MoESettings):
    """One MoE FFN layer: :class:`MoESettings` with the layer's sizes and kernels resolved.

    Attributes (besides those of :class:`MoESettings`; every field is keyword-only):
        d_model: token width D.
        d_ff: expert FFN hidden width F (required here).
        activation: expert FFN activation.
        init_std: normal init std of gate and expert weights.
        ops_backend: ``auto`` (compiled ops, loud fallback), ``custom`` (compiled or error),
            ``reference`` (pure Paddle).
    """

    d_model: int
    d_ff: int = field()  # required: field() drops the inherited default None
    activation: str = "gelu"
    init_std: float = 0.02
    ops_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.d_model <= 0:
            raise ValueError(f"d_model must be positive, got {self.d_model}")
        if self.d_ff is None:
            raise ValueError("d_ff of one MoE layer must be an int, got None (MoESettings.layer resolves it)")
        super().__post_init__()
        check_one_of(self, "activation", ACTIVATIONS)
        if self.init_std <= 0:
            raise ValueError(f"init_std must be positive, got {self.init_std}")
        check_one_of(self, "ops_backend", OPS_BACKENDS)
