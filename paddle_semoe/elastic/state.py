"""Checkpoints of an elastic multi-task job, re-planned and resharded on load.

The format is :mod:`paddle_semoe.io.checkpoint`, written collectively by
:func:`paddle_semoe.engine.checkpoint.write_checkpoint` like a GPT-MoE job's. What a shard
holds is decided per *entity* (``shared`` or ``task:<name>``): every entity is saved exactly
once, by its owner under the plan in force (shared: rank 0; task ``t``: the first rank of its
group), as

* ``param/<structured name>``: the parameter, and
* ``opt/<structured name>/<accumulator>``: its AdamW state (moments, beta powers).

The manifest's ``meta`` records the plan, the owner rank of every entity, and the SHA-256 of
every entity's parameters (:func:`entity_digest`) plus their combination ``param_sha256``
(the checksum of the gathered model).

Loading onto another world size or plan: every rank rebuilds its model for the tasks the *new*
plan gives it and pulls each of its parameters from the old owner's shard. Since each entity
is stored whole, resharding is a lookup (no slicing); the new owners write it again at the
next save. :func:`live_digest` recomputes the checksum from the parameters in memory across the
ranks, so a resumed job can prove that it holds exactly the saved model.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import paddle

from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.comm.transport import Communicator
from paddle_semoe.elastic.planner import Plan
from paddle_semoe.engine.checkpoint import write_checkpoint
from paddle_semoe.io.checkpoint import CheckpointError, Manifest, save_shard, shard_name
from paddle_semoe.io.files import sha256_from_words, sha256_to_words
from paddle_semoe.io.model_state import check_shape, opt_state_by_param
from paddle_semoe.params import entity_name, split_by_task

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_KIND",
    "checkpoint_digest",
    "combine_digests",
    "entity_digest",
    "live_digest",
    "restore_elastic",
    "save_elastic",
]

CHECKPOINT_KIND = "elastic-multitask/1"


def entity_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over ``(name, dtype, shape, bytes)`` of every array, by sorted name."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{list(a.shape)}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def combine_digests(entities: Mapping[str, str]) -> str:
    """The model checksum from per-entity digests (order independent)."""
    text = "".join(f"{name}={entities[name]}\n" for name in sorted(entities))
    return hashlib.sha256(text.encode()).hexdigest()


def _entities(plan: Plan) -> list[str]:
    names = [t.name for t in plan.tasks]
    return ["shared"] + [entity_name(t, names) for t in range(len(names))]


def _owner(plan: Plan, entity: str) -> int:
    if entity == "shared":
        return 0
    names = [t.name for t in plan.tasks]
    return plan.owner(names.index(entity.split(":", 1)[1]))


def _by_entity(named: Iterable[tuple[str, paddle.Tensor]], plan: Plan) -> dict[str, list[tuple[str, paddle.Tensor]]]:
    names = [t.name for t in plan.tasks]
    return {entity_name(t, names): ps for t, ps in split_by_task(named).items()}


def _owned_arrays(
    named_params: Iterable[tuple[str, paddle.Tensor]], plan: Plan, rank: int
) -> dict[str, dict[str, np.ndarray]]:
    """``{entity: {structured name: array}}`` of the entities ``rank`` owns under ``plan``."""
    groups = _by_entity(named_params, plan)
    return {e: {n: p.numpy() for n, p in ps} for e, ps in groups.items() if _owner(plan, e) == rank}


def _gather_digests(
    owned: Mapping[str, Mapping[str, np.ndarray]], plan: Plan, comm: Communicator, world: CommGroup
) -> tuple[str, dict[str, str]]:
    """``(param_sha256, {entity: sha256})`` on every rank: owners fill their entities' rows of
    a table, the rest are zero, summed over ``world``."""
    entities = _entities(plan)
    table = np.zeros((len(entities), 4), dtype=np.int64)
    for i, e in enumerate(entities):
        if e in owned:
            table[i] = sha256_to_words(entity_digest(owned[e]))
    total = comm.all_reduce(table, world, what="entity digests")
    out = {}
    for i, e in enumerate(entities):
        if not total[i].any():
            raise CheckpointError(f"no rank owns {e!r}: the plan places it nowhere")
        out[e] = sha256_from_words(total[i])
    return combine_digests(out), out


def live_digest(
    named_params: Iterable[tuple[str, paddle.Tensor]], plan: Plan, comm: Communicator, world: CommGroup
) -> tuple[str, dict[str, str]]:
    """Checksum of the whole model as it is in memory across the ranks (collective over ``world``).

    Returns ``(param_sha256, {entity: sha256})``, equal on every rank.
    """
    return _gather_digests(_owned_arrays(named_params, plan, world.global_rank), plan, comm, world)


def save_elastic(
    root: Path,
    step: int,
    plan: Plan,
    named_params: Iterable[tuple[str, paddle.Tensor]],
    optimizer: paddle.optimizer.Optimizer,
    progress: Mapping[str, Any],
    comm: Communicator,
    world: CommGroup,
    keep: int,
    write_config: Callable[[Path], Any] | None = None,
) -> tuple[Path, str]:
    """Write a checkpoint (collective over ``world``). Returns ``(final directory, param_sha256)``."""
    named = dict(named_params)
    rank = world.global_rank
    owned = _owned_arrays(named.items(), plan, rank)
    param_sha, digests = _gather_digests(owned, plan, comm, world)

    def write_files(tmp: Path) -> list:
        opt = opt_state_by_param(optimizer.state_dict(), named)
        tensors: dict[str, np.ndarray] = {}
        for arrays in owned.values():
            for n, a in arrays.items():
                tensors[f"param/{n}"] = a
                for acc, arr in opt.get(n, {}).items():
                    tensors[f"opt/{n}/{acc}"] = arr
        meta = {"rank": rank, "entities": sorted(owned), "params": {e: sorted(arrays) for e, arrays in owned.items()}}
        return [save_shard(tmp / shard_name(rank), tensors, meta)]

    manifest_meta = {
        "kind": CHECKPOINT_KIND,
        "plan": plan.to_dict(),
        "owners": {e: _owner(plan, e) for e in _entities(plan)},
        "entity_sha256": digests,
        "param_sha256": param_sha,
        "progress": dict(progress),
    }
    final = write_checkpoint(
        root, step, comm, world, write_files=write_files, meta=manifest_meta, keep=keep, write_config=write_config
    )
    return final, param_sha


def _check_kind(manifest: Manifest) -> None:
    if manifest.meta.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(
            f"checkpoint {manifest.path} is not an elastic multi-task checkpoint "
            f"(kind {manifest.meta.get('kind')!r}, expected {CHECKPOINT_KIND!r})"
        )


def restore_elastic(
    manifest: Manifest,
    plan: Plan,
    named_params: Iterable[tuple[str, paddle.Tensor]],
    optimizer: paddle.optimizer.Optimizer,
) -> dict[str, Any]:
    """Load this rank's parameters and AdamW state from the old owners' shards (any old plan).

    Returns the saved progress. Raises :class:`CheckpointError` naming the problem when the
    tasks differ, a parameter is missing or has another shape, or the checkpoint holds
    parameters of an entity that this model does not have.
    """
    _check_kind(manifest)
    where = str(manifest.path)
    old = Plan.from_dict(manifest.meta["plan"])
    old_names = [t.name for t in old.tasks]
    new_names = [t.name for t in plan.tasks]
    if old_names != new_names:
        raise CheckpointError(f"checkpoint {where} was trained on tasks {old_names}; this job has {new_names}")
    owners: dict[str, int] = manifest.meta["owners"]
    named = dict(named_params)
    shard = functools.cache(manifest.shard)
    opt_state: dict[str, paddle.Tensor] = {}
    for e, ps in _by_entity(named.items(), plan).items():
        if e not in owners:
            raise CheckpointError(f"checkpoint {where} has no owner for {e!r}")
        tensors, meta = shard(owners[e])
        saved = set(meta.get("params", {}).get(e, []))
        mine = {n for n, _ in ps}
        if saved != mine:
            missing, extra = sorted(mine - saved), sorted(saved - mine)
            raise CheckpointError(
                f"checkpoint {where}: {e!r} parameters differ from the model (missing {missing[:4]}, "
                f"unexpected {extra[:4]}): was the model config changed?"
            )
        for n, p in ps:
            check_shape(p, n, tensors[f"param/{n}"], where)
            p.set_value(tensors[f"param/{n}"])
            prefix = f"opt/{n}/"
            for k, a in tensors.items():
                if k.startswith(prefix):
                    opt_state[f"{p.name}_{k[len(prefix):]}"] = paddle.to_tensor(a)
    if opt_state:
        optimizer.set_state_dict(opt_state)
    return dict(manifest.meta["progress"])


def checkpoint_digest(manifest: Manifest) -> tuple[str, dict[str, str]]:
    """Recompute ``(param_sha256, {entity: sha256})`` from a checkpoint's files (offline)."""
    _check_kind(manifest)
    digests: dict[str, str] = {}
    for e, r in manifest.meta["owners"].items():
        tensors, meta = manifest.shard(int(r))
        names = meta["params"].get(e, [])
        digests[e] = entity_digest({n: tensors[f"param/{n}"] for n in names})
    return combine_digests(digests), digests
