"""Communicators: the collective primitives the exchange and the gradient fusion need.

Three primitives, each blocking and guarded by a :class:`CollectiveWatchdog`:

* ``all_gather_counts(counts int[k], group) -> int64 [G, k]`` (numpy, on the host): the
  count phase of the exchange;
* ``exchange_rows(x[n, D], splits int64[G, G], group) -> [sum_s splits[s, me], D]``: the
  row phase, an uneven all-to-all (``splits[a, b]`` = rows member ``a`` sends to ``b``; the
  rows of ``x`` are ordered by destination, the result by source);
* ``all_reduce_(t, group)``: in-place sum.

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

from paddle_semoe.comm.layout import check_splits, exclusive_cumsum, pairwise_schedule
from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.comm.watchdog import CollectiveWatchdog

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "Communicator",
    "GlooAllGatherCommunicator",
    "GlooPairwiseCommunicator",
    "NcclCommunicator",
    "make_communicator",
]

#: Backend names accepted by :func:`make_communicator` (``simulated`` needs a world).
BACKENDS: tuple[str, ...] = ("auto", "nccl", "gloo", "gloo_pairwise", "gloo_allgather", "simulated")
#: What ``gloo`` means (the measured-faster variant).
DEFAULT_GLOO_VARIANT = "gloo_pairwise"
#: Default per-collective bound of the watchdog, seconds.
DEFAULT_TIMEOUT_S = 300.0


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


def _without_traffic(x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> paddle.Tensor | None:
    """The result of an exchange that moves nothing (a group of one, or no rows anywhere: every
    member knows the split matrix, so all skip together), else None."""
    if group.size == 1:
        return x
    if not splits.any():
        return _row_block(x, 0, 0)
    return None


class Communicator:
    """Base class: the three primitives over :class:`CommGroup` s (see module docstring).

    Args:
        rank: this process's global rank (for messages).
        watchdog: bounds each blocking call; default: none (errors are still wrapped).
    """

    name = "base"

    def __init__(self, rank: int = 0, watchdog: CollectiveWatchdog | None = None) -> None:
        self.rank = rank
        self.watchdog = watchdog or CollectiveWatchdog(None, rank)

    # -- primitives -------------------------------------------------------------------
    def all_gather_counts(self, counts: paddle.Tensor | np.ndarray, group: CommGroup) -> np.ndarray:
        """Gather one integer vector per member: ``int64 [G, k]`` on the host."""
        raise NotImplementedError

    def exchange_rows(self, x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> paddle.Tensor:
        """Uneven all-to-all of rows (see module docstring)."""
        raise NotImplementedError

    def all_reduce_(self, t: paddle.Tensor, group: CommGroup) -> paddle.Tensor:
        """Sum ``t`` over ``group`` in place; returns ``t``."""
        raise NotImplementedError

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

    @staticmethod
    def _local_block(x: paddle.Tensor, splits: np.ndarray, me: int) -> paddle.Tensor:
        off = exclusive_cumsum(splits[me])
        return _row_block(x, int(off[me]), int(off[me] + splits[me, me]))


class _PaddleCommunicator(Communicator):
    """Shared count gather and all-reduce through ``paddle.distributed`` (Gloo or NCCL)."""

    def all_gather_counts(self, counts: paddle.Tensor | np.ndarray, group: CommGroup) -> np.ndarray:
        import paddle.distributed as dist

        if isinstance(counts, np.ndarray):
            counts = paddle.to_tensor(counts)
        counts = counts.astype("int64").reshape([-1])
        if group.size == 1:
            return counts.numpy()[None, :]
        gathered: list[paddle.Tensor] = []
        with self.watchdog.guard("all_gather_counts", group.describe()):
            dist.all_gather(gathered, counts, group=group.handle)
            out = np.stack([g.numpy() for g in gathered])  # host sync inside the guard
        return out

    def all_reduce_(self, t: paddle.Tensor, group: CommGroup) -> paddle.Tensor:
        import paddle.distributed as dist

        if group.size == 1:
            return t
        with self.watchdog.guard(f"all_reduce[{math.prod(t.shape)} elems]", group.describe()):
            dist.all_reduce(t, group=group.handle)
        return t


class NcclCommunicator(_PaddleCommunicator):
    """``alltoall_single`` with split sizes (GPU/NCCL only)."""

    name = "nccl"

    def exchange_rows(self, x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> paddle.Tensor:
        import paddle.distributed as dist

        splits = self._check_exchange(x, splits, group)
        me = group.rank_in_group
        trivial = _without_traffic(x, splits, group)
        if trivial is not None:
            return trivial
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


class GlooPairwiseCommunicator(_PaddleCommunicator):
    """Blocking send/recv over a round-robin schedule of disjoint pairs (see module doc).

    Paddle's Gloo group stamps every send, recv, all_gather, all_reduce and broadcast with
    the next value of one per-group counter, and a send only matches the receive with the
    same stamp. So every member must issue the same number of such operations before each
    round: members never skip a zero-row direction (Gloo sends 0 bytes fine), and a group
    of odd size (one member would sit out each round and fall behind) uses the padded
    all-gather instead.
    """

    name = "gloo_pairwise"

    def exchange_rows(self, x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> paddle.Tensor:
        import paddle.distributed as dist

        splits = self._check_exchange(x, splits, group)
        me = group.rank_in_group
        trivial = _without_traffic(x, splits, group)
        if trivial is not None:
            return trivial
        if group.size % 2:
            return _padded_all_gather_exchange(self, x, splits, group)
        send_off = exclusive_cumsum(splits[me])
        received: list[paddle.Tensor | None] = [None] * group.size
        received[me] = self._local_block(x, splits, me)
        tail = list(x.shape[1:])
        for partners in pairwise_schedule(group.size):
            peer = partners[me]
            n_send, n_recv = int(splits[me, peer]), int(splits[peer, me])
            peer_rank = group.ranks[peer]
            block = _row_block(x, int(send_off[peer]), int(send_off[peer]) + n_send)
            buf = paddle.empty([n_recv] + tail, dtype=x.dtype)
            where = group.describe()
            if me < peer:
                with self.watchdog.guard("exchange_rows[pairwise send]", where, str(peer_rank)):
                    dist.send(block, dst=peer_rank, group=group.handle)
                with self.watchdog.guard("exchange_rows[pairwise recv]", where, str(peer_rank)):
                    dist.recv(buf, src=peer_rank, group=group.handle)
            else:
                with self.watchdog.guard("exchange_rows[pairwise recv]", where, str(peer_rank)):
                    dist.recv(buf, src=peer_rank, group=group.handle)
                with self.watchdog.guard("exchange_rows[pairwise send]", where, str(peer_rank)):
                    dist.send(block, dst=peer_rank, group=group.handle)
            received[peer] = buf
        return _concat_rows([r for r in received if r is not None], x)


def _padded_all_gather_exchange(comm: Communicator, x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> paddle.Tensor:
    """The all-gather exchange (``splits`` already checked, ``group.size > 1``)."""
    import paddle.distributed as dist

    me = group.rank_in_group
    width = int(splits.sum(axis=1).max())
    if width == 0:  # nobody sends: every member knows it and skips
        return _row_block(x, 0, 0)
    x = x if x.is_contiguous() else x.contiguous()
    pad = width - x.shape[0]
    padded = x if pad == 0 else paddle.concat(
        [x, paddle.zeros([pad] + list(x.shape[1:]), dtype=x.dtype)], axis=0
    )
    gathered: list[paddle.Tensor] = []
    with comm.watchdog.guard("exchange_rows[padded all_gather]", group.describe()):
        dist.all_gather(gathered, padded, group=group.handle)
    parts = []
    for s in range(group.size):
        off = int(exclusive_cumsum(splits[s])[me])
        parts.append(_row_block(gathered[s], off, off + int(splits[s, me])))
    return _concat_rows(parts, x)


class GlooAllGatherCommunicator(_PaddleCommunicator):
    """Padded all_gather of whole send buffers; each member slices its blocks out."""

    name = "gloo_allgather"

    def exchange_rows(self, x: paddle.Tensor, splits: np.ndarray, group: CommGroup) -> paddle.Tensor:
        splits = self._check_exchange(x, splits, group)
        if group.size == 1:
            return x
        return _padded_all_gather_exchange(self, x, splits, group)


def _detect_backend() -> str:
    import paddle.distributed as dist

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
    import paddle.distributed as dist

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
