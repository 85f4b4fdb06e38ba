"""Expert-parallel exchange of token rows: the MoE layer's only entry into communication.

Usage from an MoE layer (``El`` local experts, ``E = ep * El`` global experts, expert ``x``
on EP rank ``x // El``)::

    exchange = ExpertExchange(topology, num_local_experts=El, backend="auto", hierarchical=False)
    local_rows, local_counts, plan = exchange.dispatch(rows, counts)   # rows [R, D], counts int32 [E]
    local_out = grouped_ffn(local_rows, local_counts, ...)              # [R_loc, D]
    rows_out = exchange.combine(local_out, plan)                         # [R, D], sender layout

Layout contract (custom_ops/README.md): ``rows`` is expert-major over global experts, expert
``x`` owns rows ``[off_x, off_x + counts[x])`` with ``off`` = exclusive prefix sum; rows past
``sum(counts)`` are padding and are not sent. ``local_rows`` is expert-major over *local*
experts and, inside local expert ``e``, ordered by source EP rank ``0..P-1`` (each source's
rows in their original order); ``local_counts[e]`` = rows of local expert ``e`` summed over
sources, so ``local_rows`` feeds a grouped FFN directly. ``combine`` is the exact inverse
route; padding rows of its output are zero.

Two phases, callable separately so they can be overlapped or fused later:

1. :meth:`ExpertExchange.exchange_counts`: all-gather of ``counts`` over the EP group (one
   small host-synchronizing collective; every rank then knows the full ``[P, E]`` count
   matrix, which both the flat and the hierarchical route need, and which a prefetcher can
   reuse) and the numpy layout math (:mod:`paddle_semoe.comm.layout`);
2. :meth:`ExpertExchange.dispatch_rows` / :meth:`ExpertExchange.combine`: the row
   exchange(s) and permutations, as a ``paddle.autograd.PyLayer``: the backward of dispatch is
   the combine route applied to the gradient, and vice versa (exact sums, no averaging).

``hierarchical=True`` routes in two steps (inside the node, then across nodes on the same
local rank, see :mod:`paddle_semoe.comm.layout`); its output layout is identical to the flat
route.

Every rank of the EP group must call dispatch/combine (and their backward) in the same
order, like any collective: a rank whose local output does not reach the loss never runs the
backward exchange and its peers then block (and the watchdog fires).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import paddle
from paddle.autograd import PyLayer

from paddle_semoe.comm.layout import (
    Exchange, Permute, Route, flat_route, hierarchical_route, invert_route, validate_count_matrix,
)
from paddle_semoe.comm.topology import Topology
from paddle_semoe.comm.transport import (DEFAULT_TIMEOUT_S, Communicator, _pad_rows,
                                         make_communicator)

logger = logging.getLogger(__name__)

__all__ = ["CountPlan", "ExchangeBase", "ExchangePlan", "ExpertExchange"]

PlanT = TypeVar("PlanT", bound="CountPlan")


@dataclass(frozen=True)
class CountPlan:
    """What the count phase of an exchange decides; shared by every exchange implementation.

    Attributes:
        count_matrix: int64 ``[P, E]``, rows EP rank ``s`` sends to global expert ``x``.
        ep_rank: this rank's index in the EP group.
        num_local_experts: ``El``.
        num_send_rows: ``sum(counts)`` of this rank (rows that leave it).
        num_input_rows: ``R``, rows of the sender buffer including padding (``-1`` until
            dispatch has seen the rows).
        local_counts: int64 ``[El]``, rows per local expert after dispatch.
        hierarchical: whether the two-step route is used.
    """

    count_matrix: np.ndarray
    ep_rank: int
    num_local_experts: int
    num_send_rows: int
    num_input_rows: int
    local_counts: np.ndarray
    hierarchical: bool

    @property
    def num_local_rows(self) -> int:
        """``R_loc = sum(local_counts)``: rows of ``local_rows``."""
        return int(self.local_counts.sum())

    def local_counts_tensor(self, place: Any = None) -> paddle.Tensor:
        """``local_counts`` as an int32 Paddle tensor (on ``place`` if given)."""
        return paddle.to_tensor(self.local_counts.astype(np.int32), place=place)

    @classmethod
    def of(
        cls: type[PlanT], C: np.ndarray, ep_rank: int, num_local_experts: int, hierarchical: bool,
        num_input_rows: int = -1, **extra: Any,
    ) -> PlanT:
        """The plan of EP rank ``ep_rank`` for the count matrix ``C`` (int64 ``[P, E]``);
        ``extra``: the fields a subclass adds."""
        El = num_local_experts
        return cls(count_matrix=C, ep_rank=ep_rank, num_local_experts=El,
                   num_send_rows=int(C[ep_rank].sum()), num_input_rows=num_input_rows,
                   local_counts=C[:, ep_rank * El : (ep_rank + 1) * El].sum(axis=0),
                   hierarchical=hierarchical, **extra)

    def check_local_out(self, local_out: paddle.Tensor) -> None:
        """Raise unless the plan has been through dispatch and ``local_out`` is ``[R_loc, D]``."""
        if self.num_input_rows < 0:
            raise ValueError("plan has not been through dispatch_rows (num_input_rows unknown)")
        if local_out.ndim != 2 or local_out.shape[0] != self.num_local_rows:
            raise ValueError(
                f"local_out must be [R_loc={self.num_local_rows}, D], "
                f"got shape {list(local_out.shape)}"
            )

    def for_rows(self: PlanT, rows: paddle.Tensor) -> PlanT:
        """This plan with ``num_input_rows`` set from the sender buffer ``rows [R, D]`` (checked)."""
        if rows.ndim != 2:
            raise ValueError(f"rows must be [R, D], got shape {list(rows.shape)}")
        R = rows.shape[0]
        if R < self.num_send_rows:
            raise ValueError(
                f"rows has {R} rows but counts sum to {self.num_send_rows}: rows must hold "
                f"sum(counts) expert-major rows (plus optional padding)"
            )
        return dataclasses.replace(self, num_input_rows=R)


@dataclass(frozen=True)
class ExchangePlan(CountPlan):
    """The count phase of :class:`ExpertExchange` plus its route (dispatch steps; combine runs
    the inverse)."""

    route: Route


@dataclass(frozen=True)
class _Leg:
    """One direction of a routed op: take the first ``take`` rows, run ``route``, pad to ``out``."""

    route: Route
    take: int
    out: int


class _Runner:
    """Executes routes with one communicator over one topology."""

    def __init__(self, comm: Communicator, topology: Topology) -> None:
        self.comm = comm
        self.topology = topology

    def run(self, x: paddle.Tensor, leg: _Leg) -> paddle.Tensor:
        x = x[: leg.take] if x.shape[0] != leg.take else x
        for step in leg.route:
            if isinstance(step, Permute):
                if step.index.size:
                    x = paddle.gather(x, paddle.to_tensor(step.index, place=x.place), axis=0)
            elif isinstance(step, Exchange):
                x = self.comm.exchange_rows(x, step.splits, getattr(self.topology, step.group))
            else:  # pragma: no cover - Route is closed
                raise TypeError(f"unknown route step {step!r}")
        return _pad_rows(x, leg.out)


class _RoutedRows(PyLayer):
    """Forward runs ``fwd``; backward runs ``bwd`` on the output gradient."""

    @staticmethod
    def forward(ctx: Any, x: paddle.Tensor, runner: _Runner, fwd: _Leg, bwd: _Leg) -> paddle.Tensor:
        ctx.runner = runner
        ctx.bwd = bwd
        out = runner.run(x, fwd)
        return out.clone() if out is x else out  # a PyLayer output must not alias its input

    @staticmethod
    def backward(ctx: Any, grad: paddle.Tensor) -> paddle.Tensor:
        return ctx.runner.run(grad, ctx.bwd)


class ExchangeBase:
    """What every expert exchange shares: the EP topology, ``El`` and the counts check."""

    def __init__(self, topology: Topology, num_local_experts: int, hierarchical: bool) -> None:
        if not isinstance(num_local_experts, int) or num_local_experts < 1:
            raise ValueError(f"num_local_experts must be a positive int, got {num_local_experts!r}")
        self.topology = topology
        self.num_local_experts = num_local_experts
        self.hierarchical = bool(hierarchical)
        self.node_size = topology.intra_node_group.size

    @property
    def ep_degree(self) -> int:
        return self.topology.ep_degree

    @property
    def num_experts(self) -> int:
        """Global expert count ``E``."""
        return self.topology.ep_degree * self.num_local_experts

    def _check_counts(self, counts: paddle.Tensor | np.ndarray) -> None:
        shape = list(counts.shape)
        if shape != [self.num_experts]:
            raise ValueError(
                f"counts must have shape [E={self.num_experts}] (ep_degree={self.ep_degree} x "
                f"num_local_experts={self.num_local_experts}), got {shape}"
            )
        if "int" not in str(counts.dtype):
            raise ValueError(f"counts must be an integer tensor (int32), got dtype {counts.dtype}")


class ExpertExchange(ExchangeBase):
    """Sends each EP rank the rows of its experts and brings the results back.

    Args:
        topology: process groups; the exchange runs in ``topology.ep_group`` (hierarchical:
            ``intra_node_group`` then ``inter_node_group``).
        num_local_experts: ``El``, experts per EP rank; ``E = ep_degree * El``.
        backend: communicator name (:data:`paddle_semoe.comm.transport.BACKENDS`) when
            ``communicator`` is not given: ``auto``, ``nccl``, ``gloo``, ``gloo_pairwise``,
            ``gloo_allgather``.
        communicator: a ready communicator (e.g. ``SimulatedWorld.communicator(rank)``);
            overrides ``backend``.
        hierarchical: use the two-step node-aware route.
        timeout_s: watchdog bound per blocking collective when ``backend`` builds the
            communicator (``None``: unbounded).
    """

    def __init__(
        self,
        topology: Topology,
        num_local_experts: int,
        *,
        backend: str = "auto",
        communicator: Communicator | None = None,
        hierarchical: bool = False,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(topology, num_local_experts, hierarchical)
        self.comm = communicator or make_communicator(backend, rank=topology.rank,
                                                      timeout_s=timeout_s)
        self._runner = _Runner(self.comm, topology)

    # -- phase 1 ----------------------------------------------------------------------
    def exchange_counts(self, counts: paddle.Tensor | np.ndarray) -> ExchangePlan:
        """Count phase (collective over the EP group): ``counts`` int ``[E]`` -> plan."""
        self._check_counts(counts)
        C = self.comm.all_gather_counts(counts, self.topology.ep_group)
        return self.plan_from_count_matrix(C)

    def plan_from_count_matrix(self, count_matrix: np.ndarray) -> ExchangePlan:
        """Layout math only (no communication): build the plan from a known count matrix."""
        P, El = self.ep_degree, self.num_local_experts
        C = validate_count_matrix(count_matrix, P, El)
        me = self.topology.ep_rank
        if self.hierarchical:
            route = hierarchical_route(C, me, El, self.node_size)
        else:
            route = flat_route(C, me, El)
        return ExchangePlan.of(C, me, El, self.hierarchical, route=route)

    # -- phase 2 ----------------------------------------------------------------------
    def dispatch_rows(self, rows: paddle.Tensor, plan: ExchangePlan) -> tuple[paddle.Tensor, ExchangePlan]:
        """Row phase of dispatch: ``rows [R, D]`` -> ``local_rows [R_loc, D]`` (differentiable).

        Returns the local rows and the plan with ``num_input_rows = R`` filled in (combine
        needs it).
        """
        plan = plan.for_rows(rows)
        there, back = self._legs(plan)
        return _RoutedRows.apply(rows, self._runner, there, back), plan

    def dispatch(
        self, rows: paddle.Tensor, counts: paddle.Tensor | np.ndarray
    ) -> tuple[paddle.Tensor, paddle.Tensor, ExchangePlan]:
        """Both phases: ``rows [R, D]``, ``counts int32 [E]`` ->
        ``(local_rows [R_loc, D], local_counts int32 [El], plan)``."""
        plan = self.exchange_counts(counts)
        local_rows, plan = self.dispatch_rows(rows, plan)
        return local_rows, plan.local_counts_tensor(place=rows.place), plan

    def combine(self, local_out: paddle.Tensor, plan: ExchangePlan) -> paddle.Tensor:
        """Inverse route: ``local_out [R_loc, D]`` -> ``rows [R, D]`` in the sender's layout.

        Rows past ``sum(counts)`` are zero. Differentiable (the backward is the dispatch route).
        """
        plan.check_local_out(local_out)
        there, back = self._legs(plan)
        return _RoutedRows.apply(local_out, self._runner, back, there)

    @staticmethod
    def _legs(plan: ExchangePlan) -> tuple[_Leg, _Leg]:
        """(dispatch leg, combine leg) of a plan that has seen its rows; each is the other's
        backward."""
        return (
            _Leg(plan.route, plan.num_send_rows, plan.num_local_rows),
            _Leg(invert_route(plan.route), plan.num_local_rows, plan.num_input_rows),
        )
