"""Typed configuration of one MoE layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GateKind = Literal["topk", "gshard", "switch"]
GATE_KINDS: tuple[str, ...] = ("topk", "gshard", "switch")
ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "relu", "silu")
OPS_BACKENDS: tuple[str, ...] = ("auto", "custom", "reference")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE FFN layer.

    Attributes:
        d_model: token width D.
        d_ff: expert FFN hidden width F.
        num_experts: experts E in total (across the expert-parallel group).
        gate: ``topk`` (any k), ``gshard`` (top-2, random routing of the second expert while
            training) or ``switch`` (top-1 with multiplicative input jitter while training).
        top_k: experts per token for the ``topk`` gate (``gshard`` uses 2, ``switch`` 1).
        capacity_factor: capacity per expert = ceil(cf * T * k / E); tokens past it are
            dropped in token order. Ignored when ``dropless``.
        eval_capacity_factor: the same while not training (inference usually drops less).
        dropless: no capacity limit; every routed token is computed.
        normalize_topk: divide the k selected probabilities by their sum. ``None`` picks the
            gate's convention: true for topk with k > 1 and gshard, false for switch.
        jitter_eps: switch gate input jitter, x * U(1 - eps, 1 + eps) on the router input.
        activation: expert FFN activation.
        aux_loss_coef: weight of the load-balance loss in ``MoEOutput.aux_loss``.
        z_loss_coef: weight of the router z-loss in ``MoEOutput.aux_loss``.
        init_std: normal init std of gate and expert weights.
        ops_backend: ``auto`` (compiled ops, loud fallback), ``custom`` (compiled or error),
            ``reference`` (pure Paddle).
    """

    d_model: int
    d_ff: int
    num_experts: int
    gate: GateKind = "topk"
    top_k: int = 2
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    dropless: bool = False
    normalize_topk: bool | None = None
    jitter_eps: float = 0.01
    activation: str = "gelu"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    init_std: float = 0.02
    ops_backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.gate not in GATE_KINDS:
            raise ValueError(f"gate must be one of {GATE_KINDS}, got {self.gate!r}")
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
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ValueError("aux_loss_coef and z_loss_coef must be >= 0")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be positive, got {self.init_std}")
        if self.ops_backend not in OPS_BACKENDS:
            raise ValueError(f"ops_backend must be one of {OPS_BACKENDS}, got {self.ops_backend!r}")

    @property
    def k(self) -> int:
        """Experts per token after the gate's convention."""
        return {"gshard": 2, "switch": 1}.get(self.gate, self.top_k)

    @property
    def normalize(self) -> bool:
        if self.normalize_topk is not None:
            return self.normalize_topk
        return self.gate == "gshard" or (self.gate == "topk" and self.k > 1)

    def capacity_factor_for(self, training: bool) -> float:
        """Effective capacity factor; <= 0 means dropless."""
        if self.dropless:
            return 0.0
        return self.capacity_factor if training else self.eval_capacity_factor
