"""Horizontal prefetch: dense parameters sharded over the sharding group, gathered ahead of use.

The horizontal axis of SE-MoE's 2D prefetch (``storage.shard_dense: true``, ``storage/README.md``).
The dense (and gate) parameters are cut into *units*, one per transformer block plus one for
everything outside the blocks; each unit is flattened and split into ``S`` equal shards over the
sharding group. Rank ``r`` keeps the AdamW moments of shard ``r`` and updates only it (gradients
arrive already reduced). After a step a background thread all-gathers the units in forward order
on a dedicated group and communicator (its own watchdog), and a forward pre-hook on each block
waits only for its own unit.

The update is the numpy AdamW of :mod:`paddle_semoe.storage.adamw` (decay on tensors with
``ndim >= 2``, like the engine's dense AdamW), so results match the all-resident dense AdamW to
float32 rounding, not bit for bit; every rank ends each gather with bit-identical parameters.
On CPU the gathered full parameters stay allocated between uses.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import paddle
import paddle.distributed as dist

from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.comm.transport import make_communicator
from paddle_semoe.params import param_class
from paddle_semoe.storage.adamw import AdamWHyper, adamw_update_, step_scalars
from paddle_semoe.storage.lazy import tensor_view
from paddle_semoe.storage.stats import StorageStats


@dataclass(frozen=True)
class _Segment:
    param: paddle.Tensor
    start: int  # offset in the unit's flat index space
    numel: int
    decay: bool


class _Unit:
    """One unit's flat index space and this rank's shard of it."""

    def __init__(self, name: str, params: Sequence[paddle.Tensor], world: int, rank: int):
        self.name = name
        sizes = [int(math.prod(p.shape)) for p in params]
        starts = [0, *itertools.accumulate(sizes)]
        self.segments = [_Segment(p, a, n, p.ndim >= 2) for p, a, n in zip(params, starts, sizes)]
        self.numel = starts[-1]
        self.shard = -(-self.numel // world) if self.numel else 0
        self.lo, self.hi = rank * self.shard, min((rank + 1) * self.shard, self.numel)
        self.m = np.zeros(max(self.hi - self.lo, 0), dtype=np.float32)
        self.v = np.zeros_like(self.m)
        self.ready = threading.Event()
        self.ready.set()

    def pieces(self, lo: int, hi: int):
        """(segment, part, at): the slice ``part`` of the segment's flat tensor that lies inside
        [lo, hi) of the unit, and the slice ``at`` where it lies in a buffer of [lo, hi)."""
        for s in self.segments:
            a, b = max(lo, s.start), min(hi, s.start + s.numel)
            if a < b:
                yield s, slice(a - s.start, b - s.start), slice(a - lo, b - lo)


class ShardedDenseParams:
    """Owner of the dense parameters under ``storage.shard_dense``.

    Args:
        units: (name, parameters) in forward order.
        hook_layers: the layer that uses each unit (None: no hook, gathered before the model).
        group_ranks: global ranks of this rank's sharding group (ascending).
        rank: this process's global rank.
        hyper: AdamW constants.
        timeout_s: watchdog bound of each gather (``None``: unbounded).
    """

    def __init__(
        self,
        units: Sequence[tuple[str, Sequence[paddle.Tensor]]],
        hook_layers: Sequence[paddle.nn.Layer | None],
        group_ranks: Sequence[int],
        rank: int,
        hyper: AdamWHyper,
        stats: StorageStats | None = None,
        timeout_s: float | None = None,
    ):
        self.world = len(group_ranks)
        self.rank_in_group = list(group_ranks).index(rank)
        self.hyper = hyper
        self.stats = stats or StorageStats()
        self.units = [_Unit(n, ps, self.world, self.rank_in_group) for n, ps in units]
        self.t = 0
        # collective: every rank of the world creates the same groups in order
        handle = dist.new_group(list(group_ranks)) if self.world > 1 else None
        self._group = CommGroup("dense_shard", tuple(group_ranks), self.rank_in_group, handle)
        self._comm = make_communicator("gloo" if self.world == 1 else "auto", rank=rank, timeout_s=timeout_s)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._hooks = [  # each block waits for its own unit only
            None if h is None else h.register_forward_pre_hook(lambda _layer, _x, i=i: self.wait(i))
            for i, h in enumerate(hook_layers)
        ]

    def interval_scalars(self) -> dict[str, float]:
        """Per-step horizontal-prefetch counters since the previous call."""
        d = self.stats.interval(1)
        return {
            "dense_gather_wait_s_per_step": d["prefetch_wait_s_per_step"],
            "dense_gather_bytes_per_step": d["h2d_bytes_per_step"],
        }

    @property
    def params(self) -> list[paddle.Tensor]:
        return [s.param for u in self.units for s in u.segments]

    def param_ids(self) -> set[int]:
        return {id(p) for p in self.params}

    # ------------------------------------------------------------------ gathers
    def wait(self, i: int) -> None:
        """Block until unit ``i`` holds every rank's latest shard."""
        u = self.units[i]
        if not u.ready.is_set():
            t0 = time.perf_counter()
            while not u.ready.wait(timeout=1.0):
                self._check_error()
            self.stats.add(wait_s=time.perf_counter() - t0)
        self._check_error()

    def wait_all(self) -> None:
        for i in range(len(self.units)):
            self.wait(i)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _check_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"horizontal prefetch (all-gather of dense shards) failed: {err!r}") from err

    def _gather(self, u: _Unit) -> None:
        send = np.zeros(u.shard, dtype=np.float32)
        for s, part, at in u.pieces(u.lo, u.hi):
            send[at] = tensor_view(s.param).reshape(-1)[part]
        gathered = self._comm.all_gather(send, self._group, what=f"dense unit {u.name}")
        for r, buf in enumerate(gathered):
            if r == self.rank_in_group:
                continue
            lo, hi = r * u.shard, min((r + 1) * u.shard, u.numel)
            for s, part, at in u.pieces(lo, hi):
                tensor_view(s.param).reshape(-1)[part] = buf[at]
        self.stats.add(h2d_bytes=u.shard * 4 * (self.world - 1))

    def _run_gathers(self) -> None:
        try:
            for u in self.units:
                self._gather(u)
                u.ready.set()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            self._error = exc
            for u in self.units:
                u.ready.set()

    def start_gathers(self) -> None:
        """Mark every unit stale and gather them in forward order in the background."""
        if self.world == 1:
            return
        if self._thread is not None:
            self._thread.join()
        for u in self.units:
            u.ready.clear()
        self._thread = threading.Thread(target=self._run_gathers, name="semoe-dense-gather", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ optimizer
    @paddle.no_grad()
    def step(self, lr: float) -> None:
        """AdamW on this rank's shard of every unit, then the background gathers."""
        self.wait_all()
        self.t += 1
        self.stats.add(steps=1)
        s = step_scalars(self.hyper, lr, self.t)
        for u in self.units:
            for seg, part, at in u.pieces(u.lo, u.hi):
                if seg.param.grad is not None:
                    p = tensor_view(seg.param).reshape(-1)[part]
                    g = tensor_view(seg.param.grad).reshape(-1)[part]
                    adamw_update_(p, u.m[at], u.v[at], g, s, decay=seg.decay)
        self.start_gathers()

    def clear_grad(self) -> None:
        for p in self.params:
            p.clear_gradient(False)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, paddle.Tensor]:
        """Full moments keyed like Paddle's (collective: gathers every rank's shard)."""
        self.wait_all()
        state: dict[str, paddle.Tensor] = {}
        for u in self.units:
            mv = np.zeros((2, u.shard), dtype=np.float32)
            mv[0, : u.m.size], mv[1, : u.v.size] = u.m, u.v
            parts = self._comm.all_gather(mv, self._group, what=f"dense unit {u.name} moments")
            whole = np.concatenate(list(parts), axis=1)
            for seg in u.segments:
                name, shape = seg.param.name, list(seg.param.shape)
                sl = slice(seg.start, seg.start + seg.numel)
                state[f"{name}_moment1_0"] = paddle.to_tensor(whole[0, sl].reshape(shape))
                state[f"{name}_moment2_0"] = paddle.to_tensor(whole[1, sl].reshape(shape))
                state[f"{name}_lazy_step_0"] = paddle.to_tensor(np.array([self.t], dtype=np.int64))
        return state

    def load_state_dict(self, state: dict) -> None:
        steps = set()
        for u in self.units:
            for seg, part, at in u.pieces(u.lo, u.hi):
                for acc, dst in (("moment1_0", u.m), ("moment2_0", u.v)):
                    key = f"{seg.param.name}_{acc}"
                    if key in state:
                        dst[at] = np.asarray(state[key].numpy(), dtype=np.float32).reshape(-1)[part]
            for seg in u.segments:
                key = f"{seg.param.name}_lazy_step_0"
                if key in state:
                    steps.add(int(np.asarray(state[key].numpy()).reshape(-1)[0]))
        if len(steps) > 1:
            raise ValueError(f"sharded dense optimizer state has inconsistent step counts {sorted(steps)}")
        if steps:
            self.t = steps.pop()


def build_sharded_dense(
    model: paddle.nn.Layer, group_ranks: Sequence[int], rank: int, hyper: AdamWHyper, timeout_s: float | None = None
) -> ShardedDenseParams:
    """Units of a GPT-style model: everything outside ``model.blocks`` first, then each block."""
    def dense(layer) -> list[paddle.Tensor]:
        return [p for p in layer.parameters() if not p.stop_gradient and param_class(p) != "expert"]

    blocks = list(getattr(model, "blocks", []))
    in_blocks = {id(p) for b in blocks for p in dense(b)}
    rest = [p for p in dense(model) if id(p) not in in_blocks]
    units = [("model", rest)] + [(f"blocks.{i}", dense(b)) for i, b in enumerate(blocks)]
    hooks: list[paddle.nn.Layer | None] = [model] + blocks
    return ShardedDenseParams(units, hooks, group_ranks, rank, hyper, timeout_s=timeout_s)
