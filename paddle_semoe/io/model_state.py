"""What a rank of a GPT-MoE job saves and how it is restored, including expert resharding.

Each rank's shard holds:

* its expert parameters ``param/<name>`` ([E_local, ...] slices of the global expert stack,
  global experts ``[expert_offset, expert_offset + E_local)``) and their AdamW state
  ``opt/<name>/<accumulator>``;
* on rank 0, every dense and gate parameter (replicated, so one copy suffices);
* the dense AdamW state it holds (all of it, or its ZeRO-1 partition);
* its RNG state and the job's progress (step, data position, counters) in the metadata.

Restoring onto a different expert-parallel degree (EP=2 -> 1 -> 4 ...) slices and
concatenates the expert stacks along dim 0 by global expert index; dense state is
re-assembled by parameter name. Names are the structured ``named_parameters`` names, so they
do not depend on Paddle's auto-generated tensor names. Part of the checkpoint format (below the
trainer, storage and inference): export restores parameters with ``optimizer=None``.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import paddle

from paddle_semoe.io.checkpoint import CheckpointError, Manifest
from paddle_semoe.params import classify_parameters

logger = logging.getLogger(__name__)

__all__ = [
    "ExpertLayout", "ShardedOptimizer", "check_shape", "collect_rank_state", "opt_state_by_param",
    "restore_rank_state", "shard_axis",
]


class ShardedOptimizer(Protocol):
    """The optimizer interface a shard needs (``paddle_semoe.engine.optim.MoEOptimizer``):
    Paddle state dicts of the ``"dense"`` and ``"expert"`` parameter groups."""

    def state_dicts(self) -> dict[str, dict]: ...

    def load_state_dicts(self, states: dict[str, dict]) -> None: ...


@dataclass(frozen=True)
class ExpertLayout:
    """Where this rank's experts sit in the global expert index space."""

    ep_degree: int
    ep_rank: int
    num_experts: int

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_degree

    @property
    def offset(self) -> int:
        return self.ep_rank * self.num_local


def _param_names(model: paddle.nn.Layer) -> dict[str, dict[str, paddle.Tensor]]:
    groups = classify_parameters(model)
    return {
        "dense": {n: p for n, p in groups["dense"] + groups["gate"]},
        "expert": {n: p for n, p in groups["expert"]},
    }


def _persistable_buffers(model: paddle.nn.Layer) -> dict[str, paddle.Tensor]:
    """Persistable non-parameter state (e.g. the aux-free routers' ``balance_bias``): identical
    on every rank, saved by rank 0 like dense parameters."""
    params = {n for n, _ in model.named_parameters()}
    return {n: t for n, t in model.state_dict().items() if n not in params}


def opt_state_by_param(state: dict, params: dict[str, paddle.Tensor]) -> dict[str, dict[str, np.ndarray]]:
    """Paddle optimizer state (keys ``<tensor name>_<acc>_0``) -> {structured name: {acc: array}}."""
    by_tensor = {p.name: n for n, p in params.items()}
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        if not hasattr(value, "numpy"):
            continue  # LR scheduler entries etc.: the schedule is a pure function of the step
        owner = max((t for t in by_tensor if key.startswith(t + "_")), key=len, default=None)
        if owner is None:
            continue
        out.setdefault(by_tensor[owner], {})[key[len(owner) + 1 :]] = value.numpy()
    return out


def _join_opt_state(entries: dict[str, dict[str, np.ndarray]], params: dict[str, paddle.Tensor]) -> dict:
    return {
        f"{params[name].name}_{acc}": paddle.to_tensor(arr)
        for name, accs in entries.items()
        if name in params
        for acc, arr in accs.items()
    }


def collect_rank_state(
    model: paddle.nn.Layer,
    optimizer: ShardedOptimizer,
    layout: ExpertLayout,
    rank: int,
    progress: dict[str, Any],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and metadata of this rank's shard."""
    names = _param_names(model)
    tensors: dict[str, np.ndarray] = {f"param/{n}": p.numpy() for n, p in names["expert"].items()}
    if rank == 0:
        tensors.update({f"param/{n}": p.numpy() for n, p in names["dense"].items()})
        tensors.update({f"buffer/{n}": b.numpy() for n, b in _persistable_buffers(model).items()})
    states = optimizer.state_dicts()
    for part in ("dense", "expert"):
        for n, accs in opt_state_by_param(states.get(part, {}), names[part]).items():
            tensors.update({f"opt/{n}/{acc}": arr for acc, arr in accs.items()})
    tensors["rng/state"] = np.frombuffer(pickle.dumps(paddle.get_rng_state()), dtype=np.uint8)
    meta = {
        "rank": rank,
        "ep_degree": layout.ep_degree,
        "ep_rank": layout.ep_rank,
        "num_experts": layout.num_experts,
        "expert_offset": layout.offset,
        "num_local_experts": layout.num_local,
        "expert_params": sorted(names["expert"]),
        "progress": progress,
    }
    return tensors, meta


def check_shape(p: paddle.Tensor, name: str, arr: np.ndarray, where: str) -> None:
    """:class:`CheckpointError` naming ``name`` when checkpoint ``where``'s ``arr`` does not
    have the shape of the model's ``p``."""
    if list(arr.shape) != list(p.shape):
        raise CheckpointError(
            f"checkpoint {where}: parameter {name!r} has shape {list(arr.shape)}, the model expects "
            f"{list(p.shape)} (was the model config changed?)"
        )


def _set_param(p: paddle.Tensor, name: str, arr: np.ndarray, where: str) -> None:
    check_shape(p, name, arr, where)
    p.set_value(arr.astype(np.dtype(str(p.dtype).replace("paddle.", ""))))


def restore_rank_state(
    manifest: Manifest,
    model: paddle.nn.Layer,
    optimizer: ShardedOptimizer | None,
    layout: ExpertLayout,
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    """Load parameters, optimizer state and RNG for this rank; returns rank 0's progress dict.

    With ``optimizer=None`` only parameters are loaded (export, evaluation)."""
    names = _param_names(model)
    where = str(manifest.path)
    old_meta = manifest.meta
    if old_meta.get("num_experts", layout.num_experts) != layout.num_experts:
        raise CheckpointError(
            f"checkpoint {where} has {old_meta.get('num_experts')} experts per MoE layer, the model has "
            f"{layout.num_experts}: experts cannot be resharded across a different expert count"
        )
    cache: dict[int, tuple[dict, dict]] = {}

    def shard(r: int):
        if r not in cache:
            cache[r] = manifest.shard(r)
        return cache[r]

    tensors0, meta0 = shard(0)
    progress = meta0["progress"]
    # dense parameters and buffers: rank 0 holds them all
    for prefix, tensors, what in (("param", names["dense"], "dense parameter"),
                                  ("buffer", _persistable_buffers(model), "the model's buffer")):
        for n, p in tensors.items():
            if f"{prefix}/{n}" not in tensors0:
                raise CheckpointError(f"checkpoint {where} lacks {what} {n!r} (different model?)")
            _set_param(p, n, tensors0[f"{prefix}/{n}"], where)
    extra = sorted(k[6:] for k in tensors0 if k.startswith("param/") and k[6:] not in names["dense"] and k[6:] not in names["expert"])
    if extra:
        raise CheckpointError(f"checkpoint {where} has parameters the model lacks: {extra[:5]} (different model?)")

    # owned ("expert"-class) parameters: each EP rank holds an equal contiguous slice along the
    # parameter's shard axis (0 for expert stacks, 1 for a partitioned embedding); re-cut the
    # global tensor for this rank from the old owners' slices
    old_ep = int(old_meta.get("ep_degree", 1))
    expert_opt: dict[str, dict[str, np.ndarray]] = {}
    for n, p in names["expert"].items():
        axis = shard_axis(p)
        new_local = p.shape[axis]
        total = new_local * layout.ep_degree
        if total % old_ep:
            raise CheckpointError(f"checkpoint {where}: {n!r} (global size {total}) cannot be split {old_ep} ways")
        old_local = total // old_ep
        lo, hi = layout.ep_rank * new_local, (layout.ep_rank + 1) * new_local
        pieces: list[np.ndarray] = []
        opt_pieces: dict[str, list[np.ndarray]] = {}
        for old_rank in range(lo // old_local, (hi - 1) // old_local + 1):
            t, _ = shard(old_rank)
            a, b = max(lo - old_rank * old_local, 0), min(hi - old_rank * old_local, old_local)
            key = f"param/{n}"
            if key not in t:
                raise CheckpointError(f"checkpoint {where} rank {old_rank} lacks owned parameter {n!r}")
            pieces.append(_take(t[key], axis, a, b))
            for k, arr in t.items():
                if k.startswith(f"opt/{n}/"):  # moments sliced, scalars whole
                    sliced = _take(arr, axis, a, b) if arr.shape == t[key].shape else arr
                    opt_pieces.setdefault(k[len(f"opt/{n}/") :], []).append(sliced)
        _set_param(p, n, np.concatenate(pieces, axis=axis), where)
        expert_opt[n] = {
            acc: (np.concatenate(v, axis=axis) if v[0].ndim == p.ndim else v[0]) for acc, v in opt_pieces.items()
        }

    if optimizer is None:
        return progress

    # dense optimizer state: merged by name from every shard that has some
    dense_opt: dict[str, dict[str, np.ndarray]] = {}
    sharded = bool(old_meta.get("sharded_dense_optimizer", False))  # ZeRO-1: spread over shards
    for r in range(manifest.world_size):
        t, _ = shard(r) if (r in cache or sharded) else ({}, {})
        for k, arr in t.items():
            if k.startswith("opt/"):
                n, acc = k[4:].rsplit("/", 1)
                if n in names["dense"]:
                    dense_opt.setdefault(n, {})[acc] = arr
    optimizer.load_state_dicts(
        {"dense": _join_opt_state(dense_opt, names["dense"]), "expert": _join_opt_state(expert_opt, names["expert"])}
    )

    if manifest.world_size == world_size and old_ep == layout.ep_degree:
        paddle.set_rng_state(pickle.loads(shard(rank)[0]["rng/state"].tobytes()))
    else:
        seed = int(progress.get("seed", 0)) * 1_000_003 + int(progress.get("step", 0)) * 101 + rank
        paddle.seed(seed)
        logger.info(
            "resharded restore (world %d -> %d, EP %d -> %d): RNG reseeded with %d",
            manifest.world_size, world_size, old_ep, layout.ep_degree, seed,
        )
    return progress


def shard_axis(p: paddle.Tensor) -> int:
    """Axis along which an owned parameter is split over the EP group (experts: 0)."""
    return int(getattr(p, "semoe_shard_axis", 0))


def _take(arr: np.ndarray, axis: int, a: int, b: int) -> np.ndarray:
    return arr[(slice(None),) * axis + (slice(a, b),)]

