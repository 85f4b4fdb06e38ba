"""Row layout of the expert exchange: split sizes and permutations (numpy only, no comm).

Notation: ``P`` EP ranks, ``El`` local experts per rank, ``E = P * El`` experts; expert ``x``
lives on EP rank ``x // El``. ``C[s, x]`` (the *count matrix*, int64 ``[P, E]``) is the number
of rows EP rank ``s`` sends to expert ``x``; every rank knows all of ``C`` after the count
phase.

Sender ``s`` holds rows expert-major over global experts (custom_ops/README.md), so the rows for
EP rank ``d`` already form one contiguous block (experts ``[d*El, (d+1)*El)``): the flat send
buffer needs no permutation. Receiver ``d`` gets the blocks of sources ``0..P-1`` in order,
each expert-major over its local experts (the *source-major buffer*), and permutes it into the
*target layout*: local expert major, source rank minor.

Hierarchical route (``L`` ranks per node inside the EP group, ``N = P / L`` nodes, EP rank
``s = n*L + j``):

1. at ``(n, j)``: reorder the send blocks from destination order ``d = m*L + j'`` into
   ``[j'][m]`` order; exchange inside the node (group rank ``j``); ``(n, j')`` receives from
   each local ``j`` the blocks ``[m]`` of rows ``(n, j) -> (m, j')``;
2. at ``(n, j')``: reorder ``[j][m]`` to ``[m][j]``; exchange across nodes in the rail
   (group rank ``n``); ``(m, j')`` receives from each node ``n`` the blocks ``[j]`` of rows
   ``(n, j) -> (m, j')``: sources ascending, i.e. exactly the flat source-major buffer.

So both routes end in the same buffer and share the final permutation: the layouts are
identical by construction (and tested).

A route is a sequence of :class:`Permute` and :class:`Exchange` steps; the reverse route
(combine, and the backward of dispatch) runs the inverted steps in reverse order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

__all__ = [
    "Exchange",
    "Permute",
    "Route",
    "Step",
    "block_permutation",
    "flat_route",
    "hierarchical_route",
    "invert_route",
    "pairwise_schedule",
    "rank_split_matrix",
    "receive_permutation",
    "validate_count_matrix",
]


@dataclass(frozen=True)
class Permute:
    """``out = x[index]``; ``index`` int64 ``[n]`` is a permutation of ``range(n)``."""

    index: np.ndarray

    @property
    def inverse(self) -> "Permute":
        inv = np.empty_like(self.index)
        inv[self.index] = np.arange(self.index.size, dtype=self.index.dtype)
        return Permute(inv)


@dataclass(frozen=True)
class Exchange:
    """Uneven all-to-all inside one group.

    ``splits[a, b]`` (int64 ``[G, G]``) = rows group member ``a`` sends to member ``b``; the
    rows of member ``a`` are ordered by destination ``b`` and it receives blocks ordered by
    source. ``group`` is the attribute name of the group in :class:`Topology`
    (``"ep_group"``, ``"intra_node_group"``, ``"inter_node_group"``).
    """

    group: str
    splits: np.ndarray

    @property
    def inverse(self) -> "Exchange":
        return Exchange(self.group, np.ascontiguousarray(self.splits.T))


Step = Union[Permute, Exchange]
Route = tuple[Step, ...]


def validate_count_matrix(C: np.ndarray, num_ranks: int, num_local_experts: int) -> np.ndarray:
    """Check ``C`` is a non-negative integer ``[P, P*El]`` matrix; return it as int64."""
    C = np.asarray(C)
    if C.ndim != 2 or C.shape != (num_ranks, num_ranks * num_local_experts):
        raise ValueError(
            f"count matrix must have shape [P={num_ranks}, E={num_ranks * num_local_experts}], "
            f"got {list(C.shape)}"
        )
    if not np.issubdtype(C.dtype, np.integer):
        raise ValueError(f"count matrix must be integer, got {C.dtype}")
    if (C < 0).any():
        s, x = np.argwhere(C < 0)[0]
        raise ValueError(f"count matrix has a negative count {C[s, x]} (source {s}, expert {x})")
    return C.astype(np.int64, copy=False)


def rank_split_matrix(C: np.ndarray, num_local_experts: int) -> np.ndarray:
    """``S[s, d]`` = rows EP rank ``s`` sends to EP rank ``d`` (int64 ``[P, P]``)."""
    P = C.shape[0]
    return C.reshape(P, P, num_local_experts).sum(axis=2)


def block_permutation(sizes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Gather index that lays consecutive blocks out in a new order.

    Args:
        sizes: int ``[B]``, block ``b`` occupies ``[off_b, off_b + sizes[b])`` of the input,
            ``off`` = exclusive prefix sum.
        order: int ``[B]``, a permutation of the block ids: output = blocks ``order[0]``,
            ``order[1]``, ...

    Returns:
        int64 ``[sum(sizes)]`` index with ``out = x[index]``.
    """
    sizes = np.asarray(sizes, dtype=np.int64).ravel()
    order = np.asarray(order, dtype=np.int64).ravel()
    lengths = sizes[order]
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # out position p inside output block k maps to starts[order[k]] + (p - out_start[k])
    delta = exclusive_cumsum(sizes)[order] - exclusive_cumsum(lengths)
    return np.arange(total, dtype=np.int64) + np.repeat(delta, lengths)


def receive_permutation(C: np.ndarray, me: int, num_local_experts: int) -> np.ndarray:
    """Index from the source-major receive buffer of EP rank ``me`` to the target layout.

    Buffer blocks are ``(s, e)`` in s-major order with sizes ``C[s, me*El + e]``; the target
    is e-major: local expert ``e``, then source ``s``.
    """
    El = num_local_experts
    P = C.shape[0]
    sizes = C[:, me * El : (me + 1) * El]  # [P, El], blocks (s, e) s-major
    order = (np.arange(El)[:, None] + El * np.arange(P)[None, :]).ravel()  # e-major
    return block_permutation(sizes.ravel(), order)


def _permute_step(index: np.ndarray) -> list[Step]:
    """``[Permute(index)]``, or no step for the identity."""
    return [] if np.array_equal(index, np.arange(index.size)) else [Permute(index)]


def flat_route(C: np.ndarray, me: int, num_local_experts: int) -> Route:
    """Route of EP rank ``me``: one exchange in the EP group, then the target permutation."""
    S = rank_split_matrix(C, num_local_experts)
    return (Exchange("ep_group", S), *_permute_step(receive_permutation(C, me, num_local_experts)))


def hierarchical_route(C: np.ndarray, me: int, num_local_experts: int, node_size: int) -> Route:
    """Two-step route of EP rank ``me`` with ``node_size`` EP ranks per node.

    ``node_size`` must divide ``P``; ``node_size == P`` (one node) gives a route whose inter
    exchange is inside a one-rank group (a no-op).
    """
    P = C.shape[0]
    L = node_size
    if L < 1 or P % L:
        raise ValueError(f"node_size={L} must divide the EP group size {P}")
    N = P // L
    n, j = divmod(me, L)
    S = rank_split_matrix(C, num_local_experts)  # [P, P]
    S4 = S.reshape(N, L, N, L)  # [n, j, m, j']
    # step 1: my send blocks in destination order d = m*L + j' -> [j'][m]
    order1 = (np.arange(N)[None, :] * L + np.arange(L)[:, None]).ravel()  # k = j'*N + m -> d
    perm1 = block_permutation(S[me], order1)
    splits1 = S4[n].sum(axis=1)  # [j, j'] = sum_m S[(n,j), (m,j')]
    # step 2: at (n, j) (now playing j'): buffer blocks [src j][dst m] -> [m][j]
    sizes2 = S4[n, :, :, j]  # [j_src, m]
    order2 = (np.arange(L)[None, :] * N + np.arange(N)[:, None]).ravel()  # k = m*L + j -> j*N + m
    perm2 = block_permutation(sizes2.ravel(), order2)
    splits2 = S4[:, :, :, j].sum(axis=1)  # [n, m] = sum_j S[(n,j), (m,j')] on rail j'=j
    return (
        *_permute_step(perm1),
        Exchange("intra_node_group", splits1),
        *_permute_step(perm2),
        Exchange("inter_node_group", splits2),
        *_permute_step(receive_permutation(C, me, num_local_experts)),
    )


def invert_route(route: Route) -> Route:
    """The route that undoes ``route`` (inverse steps, reverse order)."""
    return tuple(step.inverse for step in reversed(route))


def pairwise_schedule(size: int) -> list[list[int]]:
    """Deadlock-free rounds of disjoint pairs covering every pair of ``size`` members once.

    Round-robin (circle method): returns ``rounds[k][i]`` = partner of member ``i`` in round
    ``k``, or ``-1`` when ``i`` sits the round out (odd sizes). ``size - 1`` rounds for even
    sizes, ``size`` for odd ones. Every member walks the rounds in the same order, and inside
    a pair the lower member sends first, so blocking send/recv never waits on a cycle.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    n = size if size % 2 == 0 else size + 1  # add a ghost member for odd sizes
    rounds: list[list[int]] = []
    for k in range(n - 1):
        partner = [(2 * k - i) % (n - 1) for i in range(n - 1)] + [k]
        partner[k] = n - 1  # member k meets the fixed member n - 1
        rounds.append([p if p < size else -1 for p in partner[:size]])
    return rounds


def check_splits(splits: np.ndarray, group_size: int, what: str) -> np.ndarray:
    """Validate a ``[G, G]`` split matrix; returns it as int64."""
    splits = np.asarray(splits)
    if splits.shape != (group_size, group_size):
        raise ValueError(f"{what}: split matrix must be [{group_size}, {group_size}], got {list(splits.shape)}")
    if (splits < 0).any():
        raise ValueError(f"{what}: split matrix has negative entries")
    return splits.astype(np.int64, copy=False)


def exclusive_cumsum(x: Sequence[int] | np.ndarray) -> np.ndarray:
    """``[0, x0, x0+x1, ...]`` without the total (int64)."""
    x = np.asarray(x, dtype=np.int64)
    return np.concatenate(([0], np.cumsum(x)[:-1])).astype(np.int64) if x.size else x
