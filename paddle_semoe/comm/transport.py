"""Communicators: the one collectives layer of the project (exchange, gradients, training loop).

Every call is blocking and runs under the communicator's :class:`CollectiveWatchdog`, so a peer
that dies or hangs makes the others fail within the timeout with a message naming the
collective, the group and the peer(s):

* ``exchange_rows(x[n, D], splits int64[G, G], group) -> [sum_s splits[s, me], D]``: the
  row phase of the expert exchange, an uneven all-to-all (``splits[a, b]`` = rows member
  ``a`` sends to ``b``; the rows of ``x`` are ordered by destination, the result by source);
* ``all_reduce_(t, group, op)``: in-place sum or max of a tensor (gradients stay on the device);
* host values (numpy int64, float32 or float64, equal shapes on every member):
  ``all_reduce(a, group, op) -> a'`` (sum / max), ``broadcast(a, group, src) -> a'``,
  ``all_gather(a, group) -> [G, *a.shape]`` (``all_gather_counts``: int64, the count phase of
  the exchange), ``barrier(group)``.

A group of one member never communicates.

Backends (:func:`make_communicator`):

``nccl``
    ``paddle.distributed.alltoall_single`` with in/out split sizes. GPU only.
``gloo_pairwise``
    Paddle's Gloo group has no all_to_all, alltoall_single or reduce_scatter, and its
    isend/irecv are unreliable; blocking ``send``/``recv`` work but a send waits for the
    matching receive, so two peers that both send first deadlock. This backend walks a
    round-robin schedule of disjoint pairs (:func:`pairwise_schedule`); inside a pair the
    lower rank sends then receives, the higher one receives then sends. Zero-row
    directions still send 0 bytes (Gloo matches messages by a per-group operation counter
    that must stay in step on all members); odd group sizes use the all-gather variant.
    Traffic: exactly the rows that move.
``gloo_allgather``
    ``all_gather`` needs equal shapes, so every member pads its send buffer to the largest
    send buffer of the group (known from the split matrix) and all-gathers it; each member
    slices out the blocks addressed to it. One collective, but every member receives
    ``G * max_send`` rows: ``G`` times the necessary traffic.
``gloo``
    The default on CPU: pairwise. Measured with tools/bench_comm.py (2 and 4 processes, 2
    cores): equal within noise up to ~256 KiB sent per rank (both latency-bound, ~1.5 ms
    with 2 processes, ~6-8 ms with 4), pairwise 1.6-3x faster from 512 KiB to 8 MiB.
``simulated``
    All ranks in one process (threads): :mod:`paddle_semoe.comm.simulated`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist

from paddle_semoe.comm.layout import check_splits, exclusive_cumsum, pairwise_schedule
from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.comm.watchdog import CollectiveWatchdog

logger = logging.getLogger(__name__)

_REDUCE = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

__all__ = [
    "BACKENDS",
    "Communicator",
    "GlooAllGatherCommunicator",
    "GlooPairwiseCommunicator",
    "NcclCommunicator",
    "REDUCE_OPS",
    "make_communicator",
]

#: Backend names accepted by :func:`make_communicator` (``simulated`` needs a world).
BACKENDS: tuple[str, ...] = ("auto", "nccl", "gloo", "gloo_pairwise", "gloo_allgather", "simulated")
#: What ``gloo`` means (the measured-faster variant).
DEFAULT_GLOO_VARIANT = "gloo_pairwise"
#: Default per-collective bound of the watchdog, seconds.
DEFAULT_TIMEOUT_S = 300.0
#: Reductions accepted by ``all_reduce`` / ``all_reduce_``.
REDUCE_OPS = ("sum", "max")


def _host_array(values: Any) -> np.ndarray:
    """A contiguous copy of host values (tensors are copied to the host): integers and bools as
    int64, float32 kept (bulk data), anything else as float64."""
    arr = values.numpy() if isinstance(values, paddle.Tensor) else np.asarray(values)
    integral = np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_
    dtype = np.int64 if integral else np.float32 if arr.dtype == np.float32 else np.float64
    return np.ascontiguousarray(arr, dtype=dtype).copy()


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"reduction op must be one of {REDUCE_OPS}, got {op!r}")


def _row_block(x: paddle.Tensor, start: int, stop: int) -> paddle.Tensor:
    """``x[start:stop]`` as a contiguous tensor (Paddle marks empty slices non-contiguous,
    and its process groups reject non-contiguous tensors)."""
    if stop <= start:
        return paddle.zeros([0] + list(x.shape[1:]), dtype=x.dtype)
    block = x[start:stop]
    return block if block.is_contiguous() else block.contiguous()


def _concat_rows(parts: list[paddle.Tensor], width_like: paddle.Tensor) -> paddle.Tensor:
    """Concatenate row blocks; an empty list or all-empty blocks give ``[0, ...]``."""
    parts = [p for p in parts if p.shape[0] > 0]
    if not parts:
        return paddle.zeros([0] + list(width_like.shape[1:]), dtype=width_like.dtype)
    if len(parts) == 1:
        return parts[0]
    return paddle.concat(parts, axis=0)


def _pad_rows(x: paddle.Tensor, rows: int) -> paddle.Tensor:
    """``x [n, ...]`` with zero rows appended up to ``rows`` (``x`` itself when ``n == rows``)."""
    extra = rows - x.shape[0]
    if extra == 0:
        return x
    if extra < 0:
        raise ValueError(f"internal: {x.shape[0]} rows where at most {rows} fit")
    return paddle.concat([x, paddle.zeros([extra] + list(x.shape[1:]), dtype=x.dtype)], axis=0)


def _rows_for(
    me: int, buffers: list[paddle.Tensor], splits: np.ndarray, like: paddle.Tensor
) -> paddle.Tensor:
    """The rows member ``me`` receives, cut from every member's whole send buffer, by source."""
    parts = []
    for s, buf in enumerate(buffers):
        off = int(exclusive_cumsum(splits[s])[me])
        parts.append(_row_block(buf, off, off + int(splits[s, me])))
    return _concat_rows(parts, like)


class Communicator:
    """Base class: the collectives over :class:`CommGroup` s (see module docstring).

    Backends implement ``exchange_rows``, ``_tensor_all_reduce`` and ``_host_collective``; the
    public collectives here check arguments, skip one-member groups and label the call.

    Args:
        rank: this process's global rank (for messages).
        watchdog: bounds each blocking call; default: none (errors are still wrapped).
    """

    def __init__(self, rank: int = 0, watchdog: CollectiveWatchdog | None = None) -> None:
        self.rank = rank
        self.watchdog = watchdog or CollectiveWatchdog(None, rank)

    # -- collectives ----------------------------------------------------------------------
    def exchange_rows(self, x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> paddle.Tensor:
        """Uneven all-to-all of rows (see module docstring)."""
        raise NotImplementedError

    def all_reduce_(self, t: paddle.Tensor, group: CommGroup, op: str = "sum") -> paddle.Tensor:
        """Reduce ``t`` (``op``: sum or max) over ``group`` in place; returns ``t``."""
        _check_op(op)
        if group.size > 1:
            self._tensor_all_reduce(t, group, op, f"all_reduce[{op}, {math.prod(t.shape)} elems]")
        return t

    def all_reduce(self, values: Any, group: CommGroup, op: str = "sum", what: str | None = None) -> np.ndarray:
        """Sum or max of host values (see :func:`_host_array` for dtypes) over ``group``."""
        _check_op(op)
        arr = _host_array(values)
        if group.size == 1:
            return arr
        return self._host_collective("all_reduce", arr, group, op, 0, self._label(f"all_reduce[{op}]", what))

    def broadcast(self, values: Any, group: CommGroup, src: int = 0, what: str | None = None) -> np.ndarray:
        """Member ``src``'s (rank in group) host values on every member (equal shapes)."""
        if not 0 <= src < group.size:
            raise ValueError(f"broadcast on {group.describe()}: src={src} is not a rank in the group")
        arr = _host_array(values)
        if group.size == 1:
            return arr
        return self._host_collective("broadcast", arr, group, "sum", src, self._label("broadcast", what))

    def all_gather(self, values: Any, group: CommGroup, what: str | None = None) -> np.ndarray:
        """``[G, *shape]``: every member's host values, by group rank."""
        arr = _host_array(values)
        if group.size == 1:
            return arr[None]
        return self._host_collective("all_gather", arr, group, "sum", 0, self._label("all_gather", what))

    def all_gather_counts(self, counts: paddle.Tensor | np.ndarray, group: CommGroup) -> np.ndarray:
        """Gather one integer vector per member: ``int64 [G, k]`` on the host."""
        arr = _host_array(counts).astype(np.int64).reshape(-1)
        if group.size == 1:
            return arr[None]
        return self._host_collective("all_gather", arr, group, "sum", 0, "all_gather_counts")

    def barrier(self, group: CommGroup, what: str | None = None) -> None:
        """Wait until every member of ``group`` arrives (an all-reduce of one int64)."""
        if group.size > 1:
            self._host_collective("all_reduce", np.zeros(1, np.int64), group, "sum", 0, self._label("barrier", what))

    # -- backend hooks ----------------------------------------------------------------------
    def _tensor_all_reduce(self, t: paddle.Tensor, group: CommGroup, op: str, label: str) -> None:
        raise NotImplementedError

    def _host_collective(self, kind: str, arr: np.ndarray, group: CommGroup, op: str, src: int, label: str) -> np.ndarray:
        """``kind``: all_reduce (with ``op``), broadcast (from group rank ``src``) or all_gather."""
        raise NotImplementedError

    @staticmethod
    def _label(base: str, what: str | None) -> str:
        return base if what is None else f"{base} ({what})"

    @staticmethod
    def _peers(group: CommGroup) -> str:
        """The other members' global ranks (who a hung collective waits for)."""
        return ",".join(str(r) for r in group.ranks if r != group.global_rank) or "none"

    # -- helpers shared by the backends -----------------------------------------------
    def _check_exchange(self, x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> np.ndarray:
        splits = check_splits(splits, group.size, f"exchange_rows on {group.describe()}")
        me = group.rank_in_group
        if x.ndim < 1 or x.shape[0] != int(splits[me].sum()):
            raise ValueError(
                f"exchange_rows on {group.describe()}: x has {x.shape[0] if x.ndim else 'no'} rows, "
                f"the split matrix says rank-in-group {me} sends {int(splits[me].sum())}"
            )
        return splits


class _PaddleCommunicator(Communicator):
    """Collectives through ``paddle.distributed`` (Gloo or NCCL); backends add ``_exchange``."""

    def exchange_rows(
        self, x: paddle.Tensor, splits: np.ndarray, group: CommGroup
    ) -> paddle.Tensor:
        splits = self._check_exchange(x, splits, group)
        if group.size == 1:
            return x
        if not splits.any():  # no rows anywhere: every member knows the split matrix and skips
            return _row_block(x, 0, 0)
        return self._exchange(x, splits, group)

    def _exchange(self, x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> paddle.Tensor:
        """The exchange of a checked split matrix that moves rows, in a group of several."""
        raise NotImplementedError

    def _tensor_all_reduce(self, t: paddle.Tensor, group: CommGroup, op: str, label: str) -> None:
        with self.watchdog.guard(label, group.describe(), self._peers(group)):
            dist.all_reduce(t, op=_REDUCE[op], group=group.handle)

    def _host_collective(self, kind: str, arr: np.ndarray, group: CommGroup, op: str, src: int, label: str) -> np.ndarray:
        t = paddle.to_tensor(arr)
        with self.watchdog.guard(label, group.describe(), self._peers(group)):  # host sync inside the guard
            if kind == "all_reduce":
                dist.all_reduce(t, op=_REDUCE[op], group=group.handle)
                return t.numpy()
            if kind == "broadcast":
                dist.broadcast(t, src=group.ranks[src], group=group.handle)
                return t.numpy()
            gathered: list[paddle.Tensor] = []
            dist.all_gather(gathered, t, group=group.handle)
            return np.stack([g.numpy() for g in gathered])


class NcclCommunicator(_PaddleCommunicator):
    """``alltoall_single`` with split sizes (GPU/NCCL only)."""

    def _exchange(self, x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> paddle.Tensor:
        me = group.rank_in_group
        n_recv = int(splits[:, me].sum())
        x = x if x.is_contiguous() else x.contiguous()
        out = paddle.empty([n_recv] + list(x.shape[1:]), dtype=x.dtype)
        with self.watchdog.guard("exchange_rows[alltoall_single]", group.describe()):
            dist.alltoall_single(
                out,
                x,
                in_split_sizes=[int(v) for v in splits[me]],
                out_split_sizes=[int(v) for v in splits[:, me]],
                group=group.handle,
            )
        return out


class GlooAllGatherCommunicator(_PaddleCommunicator):
    """Padded all_gather of whole send buffers; each member slices its blocks out."""

    def _exchange(self, x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> paddle.Tensor:
        x = x if x.is_contiguous() else x.contiguous()
        padded = _pad_rows(x, int(splits.sum(axis=1).max()))  # the largest send buffer
        gathered: list[paddle.Tensor] = []
        with self.watchdog.guard("exchange_rows[padded all_gather]", group.describe()):
            dist.all_gather(gathered, padded, group=group.handle)
        return _rows_for(group.rank_in_group, gathered, splits, x)


class GlooPairwiseCommunicator(GlooAllGatherCommunicator):
    """Blocking send/recv over a round-robin schedule of disjoint pairs (see module doc); odd
    group sizes use the padded all-gather."""

    def _exchange(self, x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> paddle.Tensor:
        me = group.rank_in_group
        if group.size % 2:
            return super()._exchange(x, splits, group)
        send_off = exclusive_cumsum(splits[me])
        received: list[paddle.Tensor | None] = [None] * group.size
        received[me] = _row_block(x, int(send_off[me]), int(send_off[me] + splits[me, me]))
        tail = list(x.shape[1:])
        for partners in pairwise_schedule(group.size):
            peer = partners[me]
            n_send, n_recv = int(splits[me, peer]), int(splits[peer, me])
            peer_rank = group.ranks[peer]
            block = _row_block(x, int(send_off[peer]), int(send_off[peer]) + n_send)
            buf = paddle.empty([n_recv] + tail, dtype=x.dtype)
            steps = [("send", dist.send, block, {"dst": peer_rank}),
                     ("recv", dist.recv, buf, {"src": peer_rank})]
            for kind, fn, t, kw in steps if me < peer else steps[::-1]:  # lower member sends first
                label = f"exchange_rows[pairwise {kind}]"
                with self.watchdog.guard(label, group.describe(), str(peer_rank)):
                    fn(t, group=group.handle, **kw)
            received[peer] = buf
        return _concat_rows([r for r in received if r is not None], x)


def _detect_backend() -> str:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return DEFAULT_GLOO_VARIANT
    backend = str(dist.get_backend()).lower()
    return "nccl" if "nccl" in backend else DEFAULT_GLOO_VARIANT


def make_communicator(
    backend: str = "auto",
    *,
    rank: int | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    world: Any = None,
) -> Communicator:
    """Create a communicator.

    Args:
        backend: one of :data:`BACKENDS`; ``auto`` picks ``nccl`` when the global group is
            NCCL, else ``gloo`` (= :data:`DEFAULT_GLOO_VARIANT`).
        rank: global rank (default ``paddle.distributed.get_rank()``); required for
            ``simulated``.
        timeout_s: watchdog bound per blocking call (``None``/0: no timer).
        world: the :class:`~paddle_semoe.comm.simulated.SimulatedWorld` for ``simulated``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "simulated":
        if world is None or rank is None:
            raise ValueError("backend 'simulated' needs world= and rank=")
        return world.communicator(rank)
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    if backend == "auto":
        backend = _detect_backend()
    if backend == "gloo":
        backend = DEFAULT_GLOO_VARIANT
    cls = {
        "nccl": NcclCommunicator,
        "gloo_pairwise": GlooPairwiseCommunicator,
        "gloo_allgather": GlooAllGatherCommunicator,
    }[backend]
    return cls(rank=rank, watchdog=CollectiveWatchdog(timeout_s, rank))
