"""Embedding partitioned along the hidden dimension across the expert-parallel group.

SE-MoE (section 7 of our notes): instead of replicating a [V, D] table on every data-parallel
rank and all-reducing its gradient, each of the P ranks keeps the column slice
``[:, r*D/P : (r+1)*D/P]``. A lookup is three exchanges:

1. every rank sends its token ids to every rank (an all-gather of ids);
2. each rank looks up *all* ranks' ids in its slice -> ``[sum_i N_i, D/P]``;
3. each rank sends rank j the rows of j's ids; rank j concatenates the P slices it receives
   along the hidden dimension -> ``[N_j, D]``.

The backward runs step 3 in reverse (slices of the gradient go back to their owners), then the
lookup's own backward. The slice is owned by its rank like an expert (parameter class
``expert``, shard axis 1): its gradient already sums every rank's tokens and is never averaged
across the group. Memory per rank: V*D/P instead of V*D parameters (plus their optimizer state).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle
import paddle.nn as nn
from paddle.autograd import PyLayer

from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.comm.transport import Communicator
from paddle_semoe.params import mark_params

SHARD_AXIS_ATTR = "semoe_shard_axis"


class _ExchangeRows(PyLayer):
    """Differentiable uneven all-to-all: forward with ``splits``, backward with ``splits.T``."""

    @staticmethod
    def forward(ctx: Any, x: paddle.Tensor, comm: Communicator, group: CommGroup, splits: np.ndarray) -> paddle.Tensor:
        ctx.comm, ctx.group, ctx.splits = comm, group, splits
        return comm.exchange_rows(x, splits, group)

    @staticmethod
    def backward(ctx: Any, grad: paddle.Tensor) -> paddle.Tensor:
        return ctx.comm.exchange_rows(grad.contiguous(), ctx.splits.T.copy(), ctx.group)


class PartitionedEmbedding(nn.Layer):
    """``[V, D]`` table split over ``group`` along D. ``forward(ids int64[...]) -> [..., D]``.

    Args:
        vocab_size, d_model: the full table's shape (``d_model`` divisible by the group size).
        comm: communicator for ``group`` (see :mod:`paddle_semoe.comm.transport`); may be None
            for a group of one rank (then this is a plain embedding).
        group: the ranks sharing the table (the expert-parallel group).
        init_std: normal init of the table; slices are cut from one table drawn from ``seed``,
            so any group size holds the same embedding.
    """

    def __init__(
        self, vocab_size: int, d_model: int, comm: Communicator | None, group: CommGroup, init_std: float, seed: int = 0
    ):
        super().__init__()
        P = group.size
        if d_model % P:
            raise ValueError(f"partitioned embedding: d_model={d_model} must be divisible by the group size {P}")
        self.vocab_size, self.d_model, self.comm, self.group = vocab_size, d_model, comm, group
        self.d_local = d_model // P
        full = np.random.default_rng([seed, 0xE]).standard_normal((vocab_size, d_model)).astype("float32") * init_std
        r = group.rank_in_group
        self.weight = self.create_parameter(
            [vocab_size, self.d_local],
            default_initializer=nn.initializer.Assign(full[:, r * self.d_local : (r + 1) * self.d_local]),
        )
        mark_params([self.weight], "expert")
        setattr(self.weight, SHARD_AXIS_ATTR, 1)

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        shape = list(ids.shape)
        flat = ids.reshape([-1]).astype("int64")
        P, me = self.group.size, self.group.rank_in_group
        if P == 1:
            return nn.functional.embedding(flat, self.weight).reshape(shape + [self.d_model])
        comm = self.comm
        if comm is None:  # a layer built without one (e.g. for planning) has parameters but no forward
            raise RuntimeError(f"partitioned embedding over {P} ranks: forward needs a communicator, got None")
        n = comm.all_gather_counts(np.array([flat.shape[0]], dtype=np.int64), self.group)[:, 0]  # [P]
        # 1. ids to every rank: rank i sends its n_i ids to each rank
        id_splits = np.repeat(n[:, None], P, axis=1)
        all_ids = comm.exchange_rows(paddle.tile(flat.unsqueeze(1), [P, 1]), id_splits, self.group).reshape([-1])
        # 2. look up everyone's ids in my slice: [sum n, D/P], rows grouped by the ids' owner
        local = nn.functional.embedding(all_ids, self.weight)
        # 3. owner j gets the rows of its ids from every rank; slices concatenate along D
        row_splits = np.repeat(n[None, :], P, axis=0)
        got = _ExchangeRows.apply(local, comm, self.group, row_splits)  # [P * n_me, D/P]
        out = got.reshape([P, int(n[me]), self.d_local]).transpose([1, 0, 2]).reshape(shape + [self.d_model])
        return out
