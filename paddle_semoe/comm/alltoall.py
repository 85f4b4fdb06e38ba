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
from typing import Any

import numpy as np
import paddle
from paddle.autograd import PyLayer

from paddle_semoe.comm.layout import (
    Exchange,
    Permute,
    Route,
    flat_route,
    hierarchical_route,
    invert_route,
    validate_count_matrix,
)
from paddle_semoe.comm.topology import Topology
from paddle_semoe.comm.transport import DEFAULT_TIMEOUT_S, Communicator, make_communicator

logger = logging.getLogger(__name__)

__all__ = ["CountPlan", "ExchangePlan", "ExpertExchange"]


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

    def for_rows(self, rows: paddle.Tensor):
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


def _pad_rows(x: paddle.Tensor, rows: int) -> paddle.Tensor:
    extra = rows - x.shape[0]
    if extra == 0:
        return x
    if extra < 0:
        raise ValueError(f"internal: route produced {x.shape[0]} rows, expected at most {rows}")
    return paddle.concat([x, paddle.zeros([extra] + list(x.shape[1:]), dtype=x.dtype)], axis=0)


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


class ExpertExchange:
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
        if not isinstance(num_local_experts, int) or num_local_experts < 1:
            raise ValueError(f"num_local_experts must be a positive int, got {num_local_experts!r}")
        self.topology = topology
        self.num_local_experts = num_local_experts
        self.hierarchical = bool(hierarchical)
        if communicator is None:
            communicator = make_communicator(backend, rank=topology.rank, timeout_s=timeout_s)
        self.comm = communicator
        self._runner = _Runner(communicator, topology)
        self._node_size = topology.intra_node_group.size

    @property
    def ep_degree(self) -> int:
        return self.topology.ep_degree

    @property
    def num_experts(self) -> int:
        """Global expert count ``E``."""
        return self.topology.ep_degree * self.num_local_experts

    # -- phase 1 ----------------------------------------------------------------------
    def exchange_counts(self, counts: paddle.Tensor | np.ndarray) -> ExchangePlan:
        """Count phase (collective over the EP group): ``counts`` int ``[E]`` -> plan."""
        shape = list(counts.shape)
        if shape != [self.num_experts]:
            raise ValueError(
                f"counts must have shape [E={self.num_experts}] (ep_degree={self.ep_degree} x "
                f"num_local_experts={self.num_local_experts}), got {shape}"
            )
        dtype = str(counts.dtype)
        if "int" not in dtype:
            raise ValueError(f"counts must be an integer tensor (int32), got dtype {dtype}")
        C = self.comm.all_gather_counts(counts, self.topology.ep_group)
        return self.plan_from_count_matrix(C)

    def plan_from_count_matrix(self, count_matrix: np.ndarray) -> ExchangePlan:
        """Layout math only (no communication): build the plan from a known count matrix."""
        P, El = self.ep_degree, self.num_local_experts
        C = validate_count_matrix(count_matrix, P, El)
        me = self.topology.ep_rank
        if self.hierarchical:
            route = hierarchical_route(C, me, El, self._node_size)
        else:
            route = flat_route(C, me, El)
        return ExchangePlan(
            count_matrix=C,
            ep_rank=me,
            num_local_experts=El,
            num_send_rows=int(C[me].sum()),
            num_input_rows=-1,
            local_counts=C[:, me * El : (me + 1) * El].sum(axis=0),
            route=route,
            hierarchical=self.hierarchical,
        )

    # -- phase 2 ----------------------------------------------------------------------
    def dispatch_rows(self, rows: paddle.Tensor, plan: ExchangePlan) -> tuple[paddle.Tensor, ExchangePlan]:
        """Row phase of dispatch: ``rows [R, D]`` -> ``local_rows [R_loc, D]`` (differentiable).

        Returns the local rows and the plan with ``num_input_rows = R`` filled in (combine
        needs it).
        """
        plan = plan.for_rows(rows)
        R = plan.num_input_rows
        inverse = invert_route(plan.route)
        fwd = _Leg(plan.route, plan.num_send_rows, plan.num_local_rows)
        bwd = _Leg(inverse, plan.num_local_rows, R)
        return _RoutedRows.apply(rows, self._runner, fwd, bwd), plan

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
        if plan.num_input_rows < 0:
            raise ValueError("plan has not been through dispatch_rows (num_input_rows unknown)")
        if local_out.ndim != 2 or local_out.shape[0] != plan.num_local_rows:
            raise ValueError(
                f"local_out must be [R_loc={plan.num_local_rows}, D], got shape {list(local_out.shape)}"
            )
        inverse = invert_route(plan.route)
        fwd = _Leg(inverse, plan.num_local_rows, plan.num_input_rows)
        bwd = _Leg(plan.route, plan.num_send_rows, plan.num_local_rows)
        return _RoutedRows.apply(local_out, self._runner, fwd, bwd)
