"""The Mixture-of-Experts layer: config, router, dispatch/combine, experts, losses."""

from paddle_semoe.moe.config import MoEConfig
from paddle_semoe.moe.dispatch import Dispatch, combine, dispatch
from paddle_semoe.moe.experts import GroupedExperts
from paddle_semoe.moe.gate import Router, RouterOutput
from paddle_semoe.moe.layer import MoELayer, MoEOutput, RoutingStats
from paddle_semoe.moe.losses import load_balance_loss, router_z_loss
from paddle_semoe.moe.params import classify_parameters, mark_params, param_class

__all__ = [
    "Dispatch",
    "GroupedExperts",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "classify_parameters",
    "combine",
    "dispatch",
    "load_balance_loss",
    "mark_params",
    "param_class",
    "router_z_loss",
]
