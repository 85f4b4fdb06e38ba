"""The checkpoint format: per-rank shards, a manifest with checksums, atomic publication.

Layout of one checkpoint (a directory)::

    <root>/step_00000100/
        rank_00000.npz ... rank_<W-1>.npz   one shard per rank (numpy .npz, no pickled objects)
        config.yaml                          the resolved job config
        manifest.json                        written last: format, step, world, meta, file checksums
    <root>/latest                            name of the newest complete checkpoint

A checkpoint is written into ``step_XXXXXXXX.tmp`` and renamed into place (:func:`publish`)
only after every file and the manifest are on disk (fsync'd), so a crash never leaves a
half-written checkpoint under a final name and never touches an earlier good one. Loading
verifies sizes and SHA-256 of every file and names the file when something is wrong.
Who writes what, collectively, is :mod:`paddle_semoe.engine.checkpoint`; this module is the
format only (readers such as export need nothing above it).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from paddle_semoe.io.files import (
    FileRecord, IntegrityError, fsync_dir, records_from_json, records_to_json, sha256_bytes, verify_records, write_atomic,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO", "AUTO_VERIFIED", "FORMAT", "LATEST", "MANIFEST", "CheckpointError", "Manifest", "complete_checkpoints",
    "load_shard", "publish", "read_manifest", "remove_partial", "resolve_checkpoint", "save_shard", "shard_name",
    "step_dir_name", "write_manifest",
]

FORMAT = "paddle-semoe-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
AUTO = "auto"  # train.resume: the checkpoint ``latest`` names (refused by name if it does not verify)
AUTO_VERIFIED = "auto_verified"  # train.resume: the newest checkpoint, in save order, that verifies
_META_KEY = "__meta__"


class CheckpointError(IntegrityError):
    """A checkpoint is missing, truncated, corrupt or does not match the job."""


def shard_name(rank: int) -> str:
    return f"rank_{rank:05d}.npz"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_shard(path: Path, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> FileRecord:
    """Write one shard: arrays by name plus JSON metadata. Returns its checksum record."""
    if _META_KEY in tensors:
        raise ValueError(f"tensor name {_META_KEY!r} is reserved")
    buf = io.BytesIO()
    arrays: dict[str, Any] = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(buf, **arrays)
    data = buf.getvalue()
    write_atomic(path, data)
    return FileRecord(path.name, sha256_bytes(data), len(data))


def load_shard(path: Path, expect: FileRecord | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read a shard written by :func:`save_shard`, verifying it against ``expect``."""
    if not path.exists():
        raise CheckpointError(f"checkpoint file missing: {path}")
    data = path.read_bytes()
    if expect is not None:
        if len(data) != expect.bytes:
            raise CheckpointError(
                f"checkpoint file {path} is truncated or altered: {len(data)} bytes, manifest says {expect.bytes}"
            )
        digest = sha256_bytes(data)
        if digest != expect.sha256:
            raise CheckpointError(f"checkpoint file {path} is corrupt: sha256 {digest[:12]}... != manifest {expect.sha256[:12]}...")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({exc})") from exc
    if _META_KEY not in arrays:
        raise CheckpointError(f"checkpoint file {path} has no metadata: not a paddle-semoe shard")
    meta = json.loads(arrays.pop(_META_KEY).tobytes().decode())
    return arrays, meta


@dataclass(frozen=True)
class Manifest:
    """A checkpoint's manifest: ``meta`` is the writer's (e.g. ``meta["model"]`` = model config)."""

    path: Path
    step: int
    world_size: int
    meta: dict
    files: dict[str, FileRecord]

    def record(self, name: str) -> FileRecord:
        if name not in self.files:
            raise CheckpointError(f"checkpoint {self.path} has no file {name!r} in its manifest")
        return self.files[name]

    def shard(self, rank: int) -> tuple[dict[str, np.ndarray], dict]:
        name = shard_name(rank)
        return load_shard(self.path / name, self.record(name))


def write_manifest(ckpt_dir: Path, step: int, world_size: int, records: Sequence[FileRecord], meta: Mapping[str, Any]) -> None:
    manifest = {
        "format": FORMAT,
        "step": step,
        "world_size": world_size,
        "meta": dict(meta),
        "files": records_to_json(records),
    }
    write_atomic(ckpt_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


def read_manifest(ckpt_dir: Path | str, verify: bool = True) -> Manifest:
    """Load and (by default) fully verify a checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    mpath = ckpt_dir / MANIFEST
    if not mpath.exists():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {MANIFEST}: it is incomplete (interrupted while saving?)")
    try:
        raw = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint manifest {mpath} is corrupt: {exc}") from exc
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {ckpt_dir} has format {raw.get('format')!r}, expected {FORMAT!r}")
    files = records_from_json(raw["files"])
    if verify:
        verify_records(ckpt_dir, files.values(), "checkpoint", CheckpointError)
    return Manifest(ckpt_dir, int(raw["step"]), int(raw["world_size"]), raw.get("meta", {}), files)


def complete_checkpoints(root: Path | str) -> list[Path]:
    """The published checkpoints (a manifest, no ``.tmp``/``.old`` suffix) in ``root``, oldest
    save first (save order, not step order: a run resumed from an older checkpoint saves lower
    steps after higher ones)."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and p.suffix == "" and (p / MANIFEST).exists()]
    # save order: a checkpoint's manifest is written last, just before publication
    return sorted(done, key=lambda p: ((p / MANIFEST).stat().st_mtime_ns, p.name))


def remove_partial(root: Path | str) -> list[Path]:
    """Remove what interrupted saves left in ``root``: ``step_*.tmp`` directories (never
    published) and ``step_*.old`` backups of a re-saved step whose new copy is in place. A
    ``.old`` whose step has no published copy (a kill between the two renames of
    :func:`publish`) is renamed back instead. Returns the removed paths. Call it only while no
    save runs (at the start of a run, holding the output-directory lock)."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for path in sorted(root.glob("step_*.old")) + sorted(root.glob("step_*.tmp")):
        final = path.with_suffix("")
        if path.suffix == ".old" and not final.exists() and (path / MANIFEST).exists():
            os.replace(path, final)
            logger.warning("restored %s from %s (a save was interrupted while replacing it)", final.name, path.name)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.info("removed partial checkpoints of interrupted saves: %s", ", ".join(p.name for p in removed))
    return removed


def publish(tmp_dir: Path, final_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Rename a complete checkpoint into place, point ``latest`` at it, prune old ones.

    Pruning keeps the ``keep`` newest checkpoints in save order. ``protect`` (the checkpoint the
    run resumed from) is removed only once the new checkpoint verifies (every file re-read and
    checked against its manifest); until then it stays, whatever ``keep`` says.
    """
    root = final_dir.parent
    backup = final_dir.with_name(final_dir.name + ".old") if final_dir.exists() else None
    if backup is not None:  # re-saving the same step: keep the old one until the new is in place
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(final_dir, backup)
    os.replace(tmp_dir, final_dir)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    fsync_dir(root)
    write_atomic(root / LATEST, (final_dir.name + "\n").encode())
    stale = [p for p in complete_checkpoints(root)[:-keep] if p != final_dir]
    if protect is not None and any(p.resolve() == Path(protect).resolve() for p in stale):
        try:
            read_manifest(final_dir)  # the newer checkpoint must verify before the resumed-from one goes
        except CheckpointError as exc:
            logger.warning("keeping %s, which this run resumed from: the new checkpoint does not verify (%s)", protect, exc)
            stale = [p for p in stale if p.resolve() != Path(protect).resolve()]
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
        logger.info("removed old checkpoint %s", old)


def resolve_checkpoint(spec: str | None, root: Path) -> Path | None:
    """``None`` -> no resume; ``"auto"`` -> the latest complete checkpoint in ``root`` (or None);
    ``"auto_verified"`` -> the newest checkpoint in save order whose files all verify (the ones
    skipped are logged by name; None when ``root`` holds none, :class:`CheckpointError` when none
    verifies); anything else -> that path, which must hold a checkpoint."""
    if spec is None:
        return None
    if spec == AUTO_VERIFIED:
        done = complete_checkpoints(root)
        for path in reversed(done):
            try:
                read_manifest(path)
                return path
            except CheckpointError as exc:
                logger.warning("train.resume=auto_verified: skipping %s: %s", path.name, exc)
        if done:
            raise CheckpointError(f"no verified checkpoint in {root}: all {len(done)} fail their checks (see the log)")
        return None
    if spec == AUTO:
        latest = root / LATEST
        if not latest.exists():
            return None
        path = root / latest.read_text().strip()
        if not (path / MANIFEST).exists():
            raise CheckpointError(f"{latest} points at {path}, which is not a complete checkpoint")
        return path
    path = Path(spec)
    if path.is_dir() and not (path / MANIFEST).exists() and (path / LATEST).exists():
        path = path / (path / LATEST).read_text().strip()
    if not path.exists():
        raise CheckpointError(f"checkpoint to resume from not found: {spec}")
    return path
