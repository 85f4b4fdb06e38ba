"""Expert-parallel communication: process groups, the expert row exchange, gradient fusion.

* :mod:`~paddle_semoe.comm.topology`: :class:`Topology` (ep / expert_dp / dp / sharding /
  intra_node / inter_node groups), :func:`build_topology`, :func:`topology_from_fleet`.
* :mod:`~paddle_semoe.comm.layout`: split sizes and permutations of the flat and the
  hierarchical route (numpy, no communication).
* :mod:`~paddle_semoe.comm.transport`: communicators (``nccl``, ``gloo_pairwise``,
  ``gloo_allgather``; ``gloo`` = the faster Gloo variant) and :func:`make_communicator`.
* :mod:`~paddle_semoe.comm.simulated`: all ranks in one process (threads) for tests.
* :mod:`~paddle_semoe.comm.alltoall`: :class:`ExpertExchange` (dispatch / combine), the API
  the MoE layer calls.
* :mod:`~paddle_semoe.comm.fusion`: bucketed per-class gradient reduction and MoE-aware
  global-norm clipping.
* :mod:`~paddle_semoe.comm.watchdog`: bounded waiting and :class:`CommError`.
* :mod:`~paddle_semoe.comm.gloo_groups`: reliable Gloo group creation (a private rendezvous
  store per group); wrap ``fleet.init`` in :func:`gloo_private_rendezvous` on CPU.
  (The exchange's independent NumPy model lives with the tests: ``tests/comm/reference.py``.)
"""

from paddle_semoe.comm.alltoall import ExchangePlan, ExpertExchange
from paddle_semoe.comm.fusion import (
    Bucket,
    GradientReducer,
    build_buckets,
    clip_grad_norm_,
    global_grad_norm,
    default_bucket_bytes,
    reduce_gradients_unfused,
    reduction_rule,
)
from paddle_semoe.comm.gloo_groups import GlooGroupFactory, gloo_private_rendezvous
from paddle_semoe.comm.simulated import SimulatedCommunicator, SimulatedWorld
from paddle_semoe.comm.topology import (
    CommGroup,
    Topology,
    build_topology,
    group_rank_lists,
    topology_from_fleet,
)
from paddle_semoe.comm.transport import BACKENDS, Communicator, make_communicator
from paddle_semoe.comm.watchdog import WATCHDOG_EXIT_CODE, CollectiveWatchdog, CommError

__all__ = [
    "BACKENDS",
    "Bucket",
    "CollectiveWatchdog",
    "CommError",
    "CommGroup",
    "Communicator",
    "ExchangePlan",
    "ExpertExchange",
    "GlooGroupFactory",
    "GradientReducer",
    "SimulatedCommunicator",
    "SimulatedWorld",
    "Topology",
    "WATCHDOG_EXIT_CODE",
    "build_buckets",
    "build_topology",
    "clip_grad_norm_",
    "global_grad_norm",
    "default_bucket_bytes",
    "gloo_private_rendezvous",
    "group_rank_lists",
    "make_communicator",
    "reduce_gradients_unfused",
    "reduction_rule",
    "topology_from_fleet",
]
