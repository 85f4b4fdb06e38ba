"""Elastic MoE training for unbalanced multi-task work (SE-MoE item 6, the UFO case).

:mod:`.planner` assigns tasks to ranks from their costs (:mod:`.cost`); :mod:`.groups`,
:mod:`.sync` and :mod:`.state` give a plan its task groups, gradient sums that are exact for
every plan, and checkpoints that reload under any plan; :mod:`.trainer` is the loop,
:mod:`.timing` its per-rank busy/idle time, :mod:`.launch` the restart-on-failure wrapper.
Task-routed dispatch is :mod:`paddle_semoe.models.task_route`.
"""

from paddle_semoe.elastic.config import ElasticConfig, ElasticRunConfig, TaskSpec
from paddle_semoe.elastic.cost import CostFit, fit_linear_cost, profile_task_costs
from paddle_semoe.elastic.planner import Plan, Shard, TaskLoad, explain_plan, make_plan, plan_load_aware, plan_naive
from paddle_semoe.elastic.sync import ElasticGradSync, SyncRule, sample_weight, sync_rules

__all__ = [
    "CostFit",
    "ElasticConfig",
    "ElasticGradSync",
    "ElasticRunConfig",
    "Plan",
    "Shard",
    "SyncRule",
    "TaskLoad",
    "TaskSpec",
    "explain_plan",
    "fit_linear_cost",
    "make_plan",
    "plan_load_aware",
    "plan_naive",
    "profile_task_costs",
    "sample_weight",
    "sync_rules",
]
