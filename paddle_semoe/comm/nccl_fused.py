"""Fused expert all-to-all over NCCL: counts and rows in one custom op per direction.

The same contract as :class:`paddle_semoe.comm.alltoall.ExpertExchange` (identical
``local_rows`` layout: local expert major, source EP rank minor; ``combine`` is the exact
inverse route; rows past ``sum(counts)`` come back zero), but each direction is one compiled op
(``custom_ops/cuda/fused_a2a_op.cc``) instead of a chain of Paddle gathers and
``alltoall_single`` calls:

* ``semoe_fused_a2a_dispatch(rows, counts)``: ``ncclAllGather`` of the counts on the op's own
  communicator, then **one host wait** (split sizes and the number of received rows depend on
  every rank's counts: the Python exchange has the same sync in its ``.numpy()``), the layout
  arithmetic of ``semoe/a2a_layout.h`` on the host, and the dispatch route: grouped
  ``ncclSend``/``ncclRecv`` straight from the expert-major rows plus one row-permutation
  kernel (two exchanges and up to three permutations for the hierarchical route);
* ``semoe_fused_a2a_route(x, count_matrix)``: the route of a known count matrix in either
  direction, with no host wait: combine, and the backward of dispatch and of combine.

Communicators: one NCCL communicator per EP group (and device), separate from Paddle's, built
on first use: EP rank 0 calls ``ncclGetUniqueId``, the 128-byte id is broadcast over the
existing Paddle group (``paddle.distributed.broadcast``), then every member calls
``ncclCommInitRank``. The handle (the ``ncclComm_t`` as an int64) lives in a small registry
keyed by the group's ranks and the device, and travels to the ops as an attribute.
NCCL itself is found at run time (see :func:`nccl_library_path`).

Every rank of the EP group must call dispatch/combine (and their backward) in the same order,
like any collective. A dispatch whose peers never arrive fails after ``timeout_s``: the op
aborts the communicator (it is dropped from the registry; the next call builds a new one).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import paddle
from paddle.autograd import PyLayer

from paddle_semoe.comm.alltoall import CountPlan, ExchangeBase
from paddle_semoe.comm.layout import validate_count_matrix
from paddle_semoe.comm.topology import CommGroup, Topology
from paddle_semoe.comm.transport import DEFAULT_TIMEOUT_S, NcclCommunicator
from paddle_semoe.comm.watchdog import CollectiveWatchdog, CommError

logger = logging.getLogger(__name__)

__all__ = [
    "FusedExchangePlan",
    "FusedNcclExchange",
    "destroy_communicators",
    "fused_ops_available",
    "nccl_library_path",
]


# ----------------------------------------------------------------------------- the ops
class FusedOps(Protocol):
    """What :class:`FusedNcclExchange` needs from the compiled library (tests substitute it)."""

    def dispatch(self, rows: paddle.Tensor, counts: paddle.Tensor, comm: int, ep_rank: int, ep_size: int,
                 num_local_experts: int, node_size: int, hierarchical: bool, timeout_ms: int
                 ) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]: ...

    def route(self, x: paddle.Tensor, count_matrix: paddle.Tensor, comm: int, ep_rank: int, ep_size: int,
              num_local_experts: int, node_size: int, hierarchical: bool, inverse: bool,
              out_rows: int) -> paddle.Tensor: ...

    def gather_counts(self, counts: paddle.Tensor, group: CommGroup, watchdog: CollectiveWatchdog
                      ) -> np.ndarray: ...

    def create_comm(self, group: CommGroup, device: int, watchdog: CollectiveWatchdog) -> int: ...

    def destroy_comm(self, comm: int, abort: bool) -> None: ...


def nccl_library_path() -> str:
    """The libnccl the ops load when Paddle has not loaded one already: ``$SEMOE_NCCL_LIB``,
    else the ``nvidia-nccl-cu*`` wheel's ``lib/libnccl.so.2``, else ``""`` (the loader's
    search path)."""
    env = os.environ.get("SEMOE_NCCL_LIB")
    if env:
        return env
    try:
        import nvidia.nccl

        for base in list(getattr(nvidia.nccl, "__path__", [])):
            candidate = Path(base) / "lib" / "libnccl.so.2"
            if candidate.is_file():
                return str(candidate)
    except ImportError:
        pass
    return ""


def _compiled_library() -> Any:
    from paddle_semoe import ops

    return ops.resolve_backend("custom")


def fused_ops_available() -> bool:
    """Whether the op library has the fused NCCL ops (a CUDA build of Paddle)."""
    try:
        return hasattr(_compiled_library(), "semoe_fused_a2a_dispatch")
    except Exception:  # no build at all
        return False


class CompiledFusedOps:
    """:class:`FusedOps` over the compiled library (``custom_ops/cuda/fused_a2a_op.cc``)."""

    def __init__(self, library: str | None = None) -> None:
        lib = _compiled_library()
        if not hasattr(lib, "semoe_fused_a2a_dispatch"):
            raise RuntimeError(
                "the fused NCCL all-to-all needs the custom op library built with a CUDA build of "
                "Paddle (custom_ops/cuda/fused_a2a_op.cc is compiled only then); this Paddle "
                f"(compiled_with_cuda={paddle.is_compiled_with_cuda()}) has no such op"
            )
        self.lib = lib
        self.library = nccl_library_path() if library is None else library
        versions = lib.semoe_nccl_load(paddle.zeros([1], dtype="int64").cpu(), self.library).numpy()
        self.compiled_version, self.runtime_version = int(versions[0]), int(versions[1])
        logger.info("fused all-to-all: NCCL %d (compiled against %d)", self.runtime_version,
                    self.compiled_version)
        self.dispatch = lib.semoe_fused_a2a_dispatch
        self.route = lib.semoe_fused_a2a_route

    def gather_counts(self, counts: paddle.Tensor, group: CommGroup, watchdog: CollectiveWatchdog
                      ) -> np.ndarray:
        """int64 ``[G, E]``: every member's counts (Paddle's all_gather; one host sync)."""
        return NcclCommunicator(group.global_rank, watchdog).all_gather_counts(counts, group)

    def create_comm(self, group: CommGroup, device: int, watchdog: CollectiveWatchdog) -> int:
        """Collective over ``group``: unique id on member 0, broadcast, ncclCommInitRank."""
        anchor = paddle.zeros([1], dtype="int64").cpu()
        uid = np.zeros(16, dtype=np.int64)
        if group.rank_in_group == 0:
            uid = self.lib.semoe_nccl_unique_id(anchor, self.library).numpy()
        host = NcclCommunicator(group.global_rank, watchdog)
        uid = host.broadcast(uid, group, 0, "nccl unique id")
        with watchdog.guard("fused_a2a[ncclCommInitRank]", group.describe()):
            handle = self.lib.semoe_nccl_comm_init(paddle.to_tensor(uid, place=paddle.CPUPlace()), group.size,
                                                   group.rank_in_group, device)
        return int(handle.numpy()[0])

    def destroy_comm(self, comm: int, abort: bool) -> None:
        handle = paddle.to_tensor(np.array([comm], dtype=np.int64), place=paddle.CPUPlace())
        self.lib.semoe_nccl_comm_destroy(handle, abort)


# ------------------------------------------------------------------------ communicators
_REGISTRY_LOCK = threading.Lock()
#: (group ranks, device, global rank) -> (ncclComm_t as int, the ops that made it). The global
#: rank is constant in a real process; it keeps simulated ranks (threads) apart in tests.
_REGISTRY: dict[tuple[tuple[int, ...], int, int], tuple[int, FusedOps]] = {}


def _communicator(ops: FusedOps, group: CommGroup, device: int, watchdog: CollectiveWatchdog) -> int:
    key = (tuple(group.ranks), device, group.global_rank)
    with _REGISTRY_LOCK:
        if key in _REGISTRY:
            return _REGISTRY[key][0]
    comm = ops.create_comm(group, device, watchdog)  # collective: outside the lock
    with _REGISTRY_LOCK:
        _REGISTRY[key] = (comm, ops)
    logger.info("fused all-to-all: NCCL communicator for %s on device %d", group.describe(), device)
    return comm


def _forget_communicator(comm: int) -> None:
    with _REGISTRY_LOCK:
        for key, (c, _) in list(_REGISTRY.items()):
            if c == comm:
                del _REGISTRY[key]


def destroy_communicators() -> int:
    """Destroy every communicator this process built (call while all peers are alive, e.g.
    at the end of training); returns how many were destroyed."""
    with _REGISTRY_LOCK:
        items = list(_REGISTRY.values())
        _REGISTRY.clear()
    for comm, ops in items:
        ops.destroy_comm(comm, False)
    return len(items)


def _current_device() -> int:
    name = paddle.device.get_device()  # "gpu:3" / "cpu"
    return int(name.split(":")[1]) if ":" in name else 0


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class FusedExchangePlan(CountPlan):
    """The count phase of the fused op (see :class:`~paddle_semoe.comm.alltoall.CountPlan`),
    plus the count matrix as an int64 CPU tensor, fed to the route op as is."""

    count_matrix_tensor: paddle.Tensor | None = None


# ---------------------------------------------------------------------------- autograd
class _FusedDispatch(PyLayer):
    """Counts + rows in one op; backward = the combine route on the gradient."""

    @staticmethod
    def forward(ctx, rows, counts, ex: "FusedNcclExchange", out: dict):
        local_rows, local_counts, C = ex._call("dispatch", rows, counts)
        ctx.ex, ctx.C, ctx.rows = ex, C, rows.shape[0]
        ctx.mark_non_differentiable(local_counts)
        out["count_matrix"] = C
        return local_rows, local_counts

    @staticmethod
    def backward(ctx, grad_local_rows, *unused):
        return ctx.ex._route(grad_local_rows, ctx.C, inverse=True, out_rows=ctx.rows), None


class _FusedRoute(PyLayer):
    """A known plan in one direction; backward = the other direction."""

    @staticmethod
    def forward(ctx, x, ex: "FusedNcclExchange", plan: "FusedExchangePlan", inverse: bool, out_rows: int,
                back_rows: int):
        C = plan.count_matrix_tensor  # travels inside the plan: not a differentiable input
        ctx.ex, ctx.C, ctx.inverse, ctx.back_rows = ex, C, inverse, back_rows
        return ex._route(x, C, inverse=inverse, out_rows=out_rows)

    @staticmethod
    def backward(ctx, grad):
        return ctx.ex._route(grad, ctx.C, inverse=not ctx.inverse, out_rows=ctx.back_rows)


# ---------------------------------------------------------------------------- exchange
class FusedNcclExchange(ExchangeBase):
    """Drop-in for :class:`~paddle_semoe.comm.alltoall.ExpertExchange` on GPUs with NCCL.

    Args:
        topology: process groups; the exchange runs in ``topology.ep_group`` (its own NCCL
            communicator over those ranks). ``hierarchical`` uses
            ``topology.intra_node_group.size`` as the node size, like ``ExpertExchange``.
        num_local_experts: ``El``; ``E = ep_degree * El``.
        hierarchical: route intra-node first, then across nodes on the same local rank.
        timeout_s: bound on the count phase's host wait (``None``: unbounded); past it the
            communicator is aborted and :class:`CommError` raised.
        ops: the compiled ops (default) or a substitute with the same methods (tests).
        device: GPU index of this process (default: Paddle's current device).
    """

    def __init__(
        self,
        topology: Topology,
        num_local_experts: int,
        *,
        hierarchical: bool = False,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        ops: FusedOps | None = None,
        device: int | None = None,
    ) -> None:
        super().__init__(topology, num_local_experts, hierarchical)
        if self.hierarchical and topology.ep_degree % self.node_size:
            raise ValueError(
                f"hierarchical exchange: node size {self.node_size} must divide ep_degree {topology.ep_degree}"
            )
        self.timeout_ms = int(timeout_s * 1000) if timeout_s and timeout_s > 0 else 0
        self.watchdog = CollectiveWatchdog(timeout_s, topology.rank)
        self.ops: FusedOps = ops if ops is not None else CompiledFusedOps()
        self.device = _current_device() if device is None else device
        self._comm: int | None = None

    @property
    def comm(self) -> int:
        """The NCCL communicator handle of the EP group (built on first use; collective)."""
        if self._comm is None:
            self._comm = _communicator(self.ops, self.topology.ep_group, self.device, self.watchdog)
        return self._comm

    # -- op calls ---------------------------------------------------------------------
    def _call(self, what: str, *tensors: paddle.Tensor, **extra: Any) -> Any:
        try:
            attrs = (self.comm, self.topology.ep_rank, self.ep_degree, self.num_local_experts, self.node_size,
                     self.hierarchical)
            if what == "dispatch":
                rows, counts = tensors
                return self.ops.dispatch(rows, counts, *attrs, self.timeout_ms)
            x, C = tensors
            return self.ops.route(x, C, *attrs, extra["inverse"], extra["out_rows"])
        except Exception as exc:
            if "communicator was aborted" in str(exc):
                if self._comm is not None:
                    _forget_communicator(self._comm)
                self._comm = None
                where = self.topology.ep_group.describe()
                raise CommError(f"fused all-to-all {what} on {where}: {exc}") from exc
            raise

    def _route(self, x: paddle.Tensor, C: paddle.Tensor, *, inverse: bool, out_rows: int) -> paddle.Tensor:
        x = x if x.is_contiguous() else x.contiguous()
        return self._call("route", x, C, inverse=inverse, out_rows=out_rows)

    def _plan(self, C: paddle.Tensor, num_input_rows: int) -> FusedExchangePlan:
        Cn = C.numpy().astype(np.int64, copy=False)
        C_cpu = C if C.place.is_cpu_place() else paddle.to_tensor(Cn, place=paddle.CPUPlace())
        return FusedExchangePlan.of(Cn, self.topology.ep_rank, self.num_local_experts,
                                    self.hierarchical, num_input_rows, count_matrix_tensor=C_cpu)

    # -- ExpertExchange API -----------------------------------------------------------
    def dispatch(self, rows: paddle.Tensor, counts: paddle.Tensor | np.ndarray
                 ) -> tuple[paddle.Tensor, paddle.Tensor, FusedExchangePlan]:
        """Both phases in one op: ``rows [R, D]`` (expert-major, GPU), ``counts int32 [E]``
        -> ``(local_rows [R_loc, D], local_counts int32 [El] on the rows' device, plan)``."""
        if rows.ndim != 2:
            raise ValueError(f"rows must be [R, D], got shape {list(rows.shape)}")
        self._check_counts(counts)
        if isinstance(counts, np.ndarray) or counts.place != rows.place:
            counts = paddle.to_tensor(np.asarray(counts), place=rows.place)
        rows_c = rows if rows.is_contiguous() else rows.contiguous()
        side: dict = {}
        local_rows, local_counts = _FusedDispatch.apply(rows_c, counts, self, side)
        return local_rows, local_counts, self._plan(side["count_matrix"], rows.shape[0])

    def exchange_counts(self, counts: paddle.Tensor | np.ndarray) -> FusedExchangePlan:
        """Count phase alone (Paddle's all_gather on the EP group; one host sync), for callers
        that overlap it with other work before :meth:`dispatch_rows`."""
        self._check_counts(counts)
        counts = paddle.to_tensor(counts) if isinstance(counts, np.ndarray) else counts
        C = np.asarray(self.ops.gather_counts(counts, self.topology.ep_group, self.watchdog))
        C = validate_count_matrix(C, self.ep_degree, self.num_local_experts)
        return self._plan(paddle.to_tensor(C, place=paddle.CPUPlace()), -1)

    def dispatch_rows(self, rows: paddle.Tensor, plan: FusedExchangePlan
                      ) -> tuple[paddle.Tensor, FusedExchangePlan]:
        """Row phase of dispatch for a plan from :meth:`exchange_counts` (differentiable)."""
        plan = plan.for_rows(rows)  # _route makes the rows contiguous
        out = _FusedRoute.apply(rows, self, plan, False, plan.num_local_rows, plan.num_input_rows)
        return out, plan

    def combine(self, local_out: paddle.Tensor, plan: FusedExchangePlan) -> paddle.Tensor:
        """Inverse route: ``local_out [R_loc, D]`` -> ``rows [R, D]`` in the sender's layout
        (rows past ``sum(counts)`` zero). Differentiable: the backward is the dispatch route."""
        plan.check_local_out(local_out)
        return _FusedRoute.apply(local_out, self, plan, True, plan.num_input_rows, plan.num_local_rows)
