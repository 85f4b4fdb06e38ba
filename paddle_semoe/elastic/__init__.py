"""Elastic MoE training for unbalanced multi-task work (SE-MoE item 6, the UFO case).

* :mod:`.planner`: load-aware task -> rank assignment (pure; explained in the log), the naive
  one-rank-per-task baseline.
* :mod:`.cost`: per-task cost per sample from a profiling run, the config, or FLOPs.
* :mod:`.groups`: per-task process groups (private Gloo rendezvous).
* :mod:`.sync`: gradient sync rules (shared over all ranks, task params inside their group)
  and the loss scaling that makes them exact for every plan. Shared vs task parameters are
  tagged through :mod:`paddle_semoe.params`; task-routed dispatch (no gate, no all-to-all) is
  :mod:`paddle_semoe.models.task_route`.
* :mod:`.state`: checkpoints that reload onto another number of ranks / another plan, with
  model checksums.
* :mod:`.timing`: per-rank busy / idle time.
* :mod:`.trainer`: the training loop; :mod:`.launch`: restart-on-failure around
  ``paddle.distributed.launch``.
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
