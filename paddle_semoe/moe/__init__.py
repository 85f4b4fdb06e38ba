"""The Mixture-of-Experts layer: config, router, dispatch/combine, experts, losses."""

from paddle_semoe.moe.config import MoEConfig, MoESettings
from paddle_semoe.moe.dispatch import Dispatch, dispatch
from paddle_semoe.moe.experts import GroupedExperts
from paddle_semoe.moe.layer import MoELayer, MoEOutput, RoutingStats
from paddle_semoe.moe.losses import load_balance_loss, router_z_loss
from paddle_semoe.params import classify_parameters, mark_params, param_class
from paddle_semoe.moe.routers import (ROUTERS, Router, RouterOutput, make_router,
                                      update_balance_biases)

__all__ = [
    "Dispatch",
    "GroupedExperts",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "MoESettings",
    "ROUTERS",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "classify_parameters",
    "dispatch",
    "load_balance_loss",
    "make_router",
    "mark_params",
    "param_class",
    "router_z_loss",
    "update_balance_biases",
]
