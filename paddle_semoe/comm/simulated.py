"""A whole world of ranks inside one process, for fast tests of the real layout code.

:class:`SimulatedWorld` runs ``fn(rank)`` for every rank in its own Python thread and gives
each rank a :class:`SimulatedCommunicator` with the same primitives as the Gloo/NCCL ones,
so :class:`~paddle_semoe.comm.alltoall.ExpertExchange` and the gradient fusion run unchanged.

Scheduling: one baton (the world's lock) is held by the running rank and released only while
a rank waits inside a collective, so Paddle code never runs in two threads at once and runs
in a deterministic order. Collectives rendezvous by (group ranks, per-group sequence number);
mismatched collectives, a rank that raised, or a rank that never arrives within
``timeout_s`` make the waiting ranks raise :class:`CommError` naming the collective, the
group and the missing peers (no hang).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np
import paddle

from paddle_semoe.comm.topology import CommGroup, Topology, default_ranks_per_node
from paddle_semoe.comm.transport import Communicator, _rows_for
from paddle_semoe.comm.watchdog import CommError

logger = logging.getLogger(__name__)

__all__ = ["SimulatedCommunicator", "SimulatedWorld"]

T = TypeVar("T")


@dataclass
class _Slot:
    op: str
    payloads: dict[int, Any] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)


class SimulatedWorld:
    """``world_size`` ranks as threads of this process.

    Args:
        world_size: number of ranks.
        timeout_s: how long a rank waits in one collective for its peers.
    """

    def __init__(self, world_size: int, timeout_s: float = 60.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._cond = threading.Condition(threading.RLock())
        self._slots: dict[tuple[tuple[int, ...], int], _Slot] = {}
        self._seq: dict[tuple[int, tuple[int, ...]], int] = {}
        self._failed: dict[int, BaseException] = {}
        self._done: set[int] = set()

    # -- construction helpers ---------------------------------------------------------
    def communicator(self, rank: int) -> "SimulatedCommunicator":
        """The communicator of ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return SimulatedCommunicator(self, rank)

    def topology(
        self, rank: int, ep_degree: int, ranks_per_node: int | None = None, sharding_degree: int = 1
    ) -> Topology:
        """The topology of ``rank`` (groups have no handles: they are addressed by ranks)."""
        rpn = ranks_per_node if ranks_per_node is not None else default_ranks_per_node(self.world_size)
        return Topology.from_handles(self.world_size, rank, ep_degree, rpn, {}, sharding_degree)

    def run(self, fn: Callable[[int], T]) -> list[T]:
        """Run ``fn(rank)`` for every rank (one thread each); results by rank.

        Re-raises the first exception of the lowest failing rank (others then fail with
        :class:`CommError` instead of hanging).
        """
        results: list[Any] = [None] * self.world_size
        errors: dict[int, BaseException] = {}

        def body(rank: int) -> None:
            with self._cond:
                try:
                    results[rank] = fn(rank)
                    self._done.add(rank)
                except BaseException as exc:  # noqa: BLE001 - reported to the caller
                    errors[rank] = self._failed[rank] = exc
                finally:
                    self._cond.notify_all()

        threads = [
            threading.Thread(target=body, args=(r,), name=f"sim-rank-{r}", daemon=True)
            for r in range(self.world_size)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:  # the lowest rank whose error is not a peer's CommError, else the lowest
            root = [r for r in sorted(errors) if not isinstance(errors[r], CommError)]
            raise errors[(root or sorted(errors))[0]]
        return results

    # -- rendezvous ---------------------------------------------------------------------
    def gather(self, rank: int, group: CommGroup, op: str, payload: Any) -> list[Any]:
        """Every member contributes ``payload``; returns all payloads by group rank."""
        if group.global_rank != rank:
            raise ValueError(f"rank {rank} used group {group.describe()} of rank {group.global_rank}")
        if group.size == 1:
            return [payload]
        with self._cond:
            seq_key = (rank, group.ranks)
            seq = self._seq.get(seq_key, 0)
            self._seq[seq_key] = seq + 1
            key = (group.ranks, seq)
            slot = self._slots.setdefault(key, _Slot(op))
            if slot.op != op:
                raise CommError(
                    f"rank {rank}: collective mismatch on group {group.describe()}: this rank "
                    f"called {op!r}, a peer called {slot.op!r} (call #{seq})"
                )
            slot.payloads[group.rank_in_group] = payload
            self._cond.notify_all()
            deadline = time.monotonic() + self.timeout_s
            while len(slot.payloads) < group.size:
                missing = [group.ranks[i] for i in range(group.size) if i not in slot.payloads]
                dead = [r for r in missing if r in self._failed]
                if dead:
                    raise CommError(
                        f"rank {rank}: {op} on group {group.describe()}: peer rank(s) {dead} failed "
                        f"({type(self._failed[dead[0]]).__name__}: {self._failed[dead[0]]})"
                    )
                gone = [r for r in missing if r in self._done]
                if gone:
                    raise CommError(
                        f"rank {rank}: {op} on group {group.describe()}: peer rank(s) {gone} "
                        f"returned without joining this collective"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommError(
                        f"rank {rank}: {op} on group {group.describe()} with peer(s) {missing} did "
                        f"not finish within {self.timeout_s:.1f}s (simulated world)"
                    )
                self._cond.wait(left)
            out = [slot.payloads[i] for i in range(group.size)]
            slot.taken.add(group.rank_in_group)
            if len(slot.taken) == group.size:
                del self._slots[key]
            return out


class SimulatedCommunicator(Communicator):
    """The primitives of :class:`Communicator` for one rank of a :class:`SimulatedWorld`."""

    def __init__(self, world: SimulatedWorld, rank: int) -> None:
        super().__init__(rank=rank)  # no timer: the world's own timeout bounds each collective
        self.world = world

    def exchange_rows(self, x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> paddle.Tensor:
        splits = self._check_exchange(x, splits, group)
        me = group.rank_in_group
        if group.size == 1:
            return x
        parts = self.world.gather(self.rank, group, "exchange_rows", (x, splits))
        for s, (_, theirs) in enumerate(parts):
            if not np.array_equal(theirs, splits):
                raise CommError(
                    f"rank {self.rank}: exchange_rows on {group.describe()}: member {s} uses a "
                    f"different split matrix (layout bug): {theirs.tolist()} vs {splits.tolist()}"
                )
        return _rows_for(me, [xs for xs, _ in parts], splits, x)

    def _tensor_all_reduce(self, t: paddle.Tensor, group: CommGroup, op: str, label: str) -> None:
        parts = self.world.gather(self.rank, group, label, t.clone())
        total = parts[0]
        for p in parts[1:]:
            total = total + p if op == "sum" else paddle.maximum(total, p)
        paddle.assign(total, output=t)

    def _host_collective(self, kind: str, arr: np.ndarray, group: CommGroup, op: str, src: int, label: str) -> np.ndarray:
        parts = self.world.gather(self.rank, group, label, arr)
        if len({(p.shape, p.dtype) for p in parts}) != 1:
            raise CommError(
                f"rank {self.rank}: {label} on {group.describe()}: unequal shapes or dtypes "
                f"{[(p.shape, str(p.dtype)) for p in parts]}"
            )
        if kind == "all_gather":
            return np.stack(parts)
        if kind == "broadcast":
            return parts[src].copy()
        return np.sum(parts, axis=0) if op == "sum" else np.max(parts, axis=0)
