"""What both trainers share to run a job: the collective checkpoint writer and ``TrainingError``.

The checkpoint format itself (shards, manifest, publication) is :mod:`paddle_semoe.io.checkpoint`;
this module decides who writes what, over a :class:`~paddle_semoe.comm.transport.Communicator`
(so every wait runs under the collective watchdog):

1. member 0 of the group creates ``step_XXXXXXXX.tmp``; barrier;
2. every member writes its own files (its shard, and e.g. the SSD tier's index) and the file
   records of all members are gathered on every member;
3. member 0 writes the config and the manifest and publishes the checkpoint; barrier.

Each barrier is an agreement: an I/O error of any member in a stage (a full disk) is all-reduced
(max of member and errno), member 0 removes the partial ``.tmp`` directory, and every member
raises the same one-line :class:`~paddle_semoe.io.checkpoint.CheckpointError` naming the rank and
the cause; earlier checkpoints and ``latest`` are untouched.

Fault injection for tests: ``SEMOE_CKPT_FAULT=enospc:N`` makes the N-th shard write of this
process (counted over every :func:`write_checkpoint` call since the process started) fail as a
full disk would: its files are written, the first is cut to half its bytes (a partial file) and
``OSError(ENOSPC)`` is raised. ``enospc:N@R`` injects it only on global rank ``R``.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.comm.transport import Communicator
from paddle_semoe.io.checkpoint import CheckpointError, publish, step_dir_name, write_manifest
from paddle_semoe.io.files import FileRecord, record_of, sha256_from_words, sha256_to_words

__all__ = ["TrainingError", "gather_records", "write_checkpoint"]

_NAME_BYTES = 128  # longest file name a record can carry through the integer all-gather
FAULT_ENV = "SEMOE_CKPT_FAULT"
_shard_writes = 0  # shard-write stages this process has run (the fault point counts them)


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite steps past the limit, plans that disagree, ...)."""


def _encode(rec: FileRecord) -> np.ndarray:
    name = rec.name.encode()
    if len(name) > _NAME_BYTES:
        raise ValueError(f"checkpoint file name {rec.name!r} is longer than {_NAME_BYTES} bytes")
    words = np.frombuffer(name.ljust(_NAME_BYTES, b"\0"), dtype=np.int64)
    return np.concatenate([sha256_to_words(rec.sha256), [rec.bytes], words]).astype(np.int64)


def _decode(row: np.ndarray) -> FileRecord:
    name = np.ascontiguousarray(row[5:], dtype=np.int64).tobytes().rstrip(b"\0").decode()
    return FileRecord(name, sha256_from_words(row[:4]), int(row[4]))


def gather_records(comm: Communicator, group: CommGroup, records: Sequence[FileRecord]) -> list[FileRecord]:
    """Every member's file records on every member, in member order (collective: two all-gathers)."""
    width = 5 + _NAME_BYTES // 8
    counts = comm.all_gather([len(records)], group, what="checkpoint file counts")[:, 0]
    table = np.zeros((int(counts.max()), width), dtype=np.int64)
    for i, rec in enumerate(records):
        table[i] = _encode(rec)
    rows = comm.all_gather(table.reshape(-1), group, what="checkpoint file records").reshape(group.size, -1, width)
    return [_decode(rows[m, i]) for m in range(group.size) for i in range(int(counts[m]))]


def _parse_fault(spec: str | None) -> tuple[int, int | None]:
    """``SEMOE_CKPT_FAULT`` -> (shard write number that fails, 0: never; the only global rank, or None: any)."""
    if not spec:
        return 0, None
    kind, _, rest = spec.partition(":")
    n, _, rank = rest.partition("@")
    if kind != "enospc" or not n.isdigit() or int(n) < 1 or (rank and not rank.isdigit()):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected 'enospc:N' or 'enospc:N@RANK' with N >= 1")
    return int(n), int(rank) if rank else None


def _write_shards(write_files: Callable[[Path], Sequence[FileRecord]], tmp: Path, rank: int) -> Sequence[FileRecord]:
    """``write_files(tmp)``, failing as a full disk where ``SEMOE_CKPT_FAULT`` says so (module doc)."""
    global _shard_writes
    _shard_writes += 1
    fail_at, only_rank = _parse_fault(os.environ.get(FAULT_ENV))
    records = write_files(tmp)
    if fail_at == _shard_writes and only_rank in (None, rank):
        victim = tmp / records[0].name if records else tmp / "partial.bin"
        with open(victim, "r+b" if victim.exists() else "wb") as fh:
            fh.truncate(records[0].bytes // 2 if records else 0)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(victim))
    return records


def _cause(code: int) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full ({os.strerror(code)})"
    return f"I/O error ({os.strerror(code)})" if code > 0 else "I/O error"


def _agree(comm: Communicator, group: CommGroup, failed: OSError | None, tmp: Path, stage: str) -> None:
    """Collective: raise the same :class:`CheckpointError` on every member when any member's
    ``stage`` failed (member 0 first removes ``tmp``); return when all succeeded."""
    mine = [group.rank_in_group + 1 if failed is not None else 0, (failed.errno or 0) if failed is not None else 0]
    worst = comm.all_reduce(mine, group, "max", what=f"checkpoint {tmp.name}: {stage}")
    if int(worst[0]) == 0:
        return
    if group.rank_in_group == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    rank = group.ranks[int(worst[0]) - 1]
    name = tmp.name[: -len(".tmp")] if tmp.name.endswith(".tmp") else tmp.name
    raise CheckpointError(
        f"saving checkpoint {name} failed: {_cause(int(worst[1]))} on rank {rank} while {stage}; the partial "
        f"files were removed and earlier checkpoints are intact"
    ) from failed


def write_checkpoint(
    root: Path,
    step: int,
    comm: Communicator,
    group: CommGroup,
    *,
    write_files: Callable[[Path], Sequence[FileRecord]],
    meta: Mapping[str, Any],
    keep: int,
    write_config: Callable[[Path], Any] | None = None,
    protect: Path | None = None,
) -> Path:
    """Write checkpoint ``root/step_XXXXXXXX`` collectively over ``group`` (see the module doc).

    Args:
        write_files: called on every member with the temp directory; writes this member's files
            and returns their records (names relative to the checkpoint directory).
        meta: the manifest's ``meta`` (used on member 0).
        keep: how many complete checkpoints to keep in ``root``.
        write_config: member 0 writes the job config to the given path (``config.yaml``).
        protect: the checkpoint the run resumed from: pruned only once the new one verifies.

    Returns:
        The final checkpoint directory.
    """
    final = Path(root) / step_dir_name(step)
    tmp = final.with_name(final.name + ".tmp")
    main = group.rank_in_group == 0
    failed: OSError | None = None
    if main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            failed = exc
    _agree(comm, group, failed, tmp, "creating the directory")
    mine: Sequence[FileRecord] = []
    try:
        mine = _write_shards(write_files, tmp, group.ranks[group.rank_in_group])
    except OSError as exc:
        failed = exc
    _agree(comm, group, failed, tmp, "writing the shards")
    records = gather_records(comm, group, mine)
    if main:
        try:
            if write_config is not None:
                write_config(tmp / "config.yaml")
                records.append(record_of(tmp / "config.yaml"))
            write_manifest(tmp, step, group.size, records, meta)
            publish(tmp, final, keep, protect)
        except OSError as exc:
            failed = exc
    _agree(comm, group, failed, tmp, "publishing")
    return final
