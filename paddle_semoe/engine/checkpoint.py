"""Checkpoint files: per-rank shards, a manifest with checksums, atomic publication.

Layout of one checkpoint (a directory)::

    <root>/step_00000100/
        rank_00000.npz ... rank_<W-1>.npz   one shard per rank (numpy .npz, no pickled objects)
        config.yaml                          the resolved training config
        manifest.json                        written last: format, step, world, file checksums
    <root>/latest                            name of the newest complete checkpoint

A checkpoint is written into ``step_XXXXXXXX.tmp`` and renamed into place only after every
shard and the manifest are on disk (fsync'd), so a crash never leaves a half-written
checkpoint under a final name and never touches an earlier good one. Loading verifies sizes
and SHA-256 of every file it reads and names the file when something is wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

logger = logging.getLogger(__name__)

FORMAT = "paddle-semoe-checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
_META_KEY = "__meta__"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not match the job."""


@dataclass(frozen=True)
class FileRecord:
    name: str
    sha256: str
    bytes: int


def shard_name(rank: int) -> str:
    return f"rank_{rank:05d}.npz"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_shard(path: Path, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> FileRecord:
    """Write one shard: arrays by name plus JSON metadata. Returns its checksum record."""
    if _META_KEY in tensors:
        raise ValueError(f"tensor name {_META_KEY!r} is reserved")
    buf = io.BytesIO()
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(buf, **arrays)
    data = buf.getvalue()
    write_atomic(path, data)
    return FileRecord(path.name, hashlib.sha256(data).hexdigest(), len(data))


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
        digest = hashlib.sha256(data).hexdigest()
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


def write_manifest(ckpt_dir: Path, step: int, world_size: int, records: list[FileRecord], meta: Mapping[str, Any]) -> None:
    manifest = {
        "format": FORMAT,
        "step": step,
        "world_size": world_size,
        "meta": dict(meta),
        "files": [asdict(r) for r in records],
    }
    write_atomic(ckpt_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())


def verify_file(
    path: Path, sha256: str, nbytes: int | None, kind: str = "checkpoint", error: type[Exception] = CheckpointError
) -> None:
    """Refuse a file that is missing, has the wrong size or the wrong SHA-256, naming it."""
    if not path.exists():
        raise error(f"{kind} file missing: {path}")
    size = path.stat().st_size
    if nbytes is not None and size != nbytes:
        raise error(f"{kind} file {path} is truncated or altered: {size} bytes, manifest says {nbytes}")
    if sha256_file(path) != sha256:
        raise error(f"{kind} file {path} is corrupt: SHA-256 does not match the manifest")


def read_manifest(ckpt_dir: Path, verify: bool = True) -> Manifest:
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
    files = {f["name"]: FileRecord(**f) for f in raw["files"]}
    manifest = Manifest(ckpt_dir, int(raw["step"]), int(raw["world_size"]), raw.get("meta", {}), files)
    if verify:
        for rec in files.values():
            verify_file(ckpt_dir / rec.name, rec.sha256, rec.bytes)
    return manifest


def publish(tmp_dir: Path, final_dir: Path, keep: int) -> None:
    """Rename a complete checkpoint into place, point ``latest`` at it, prune old ones."""
    root = final_dir.parent
    if final_dir.exists():  # re-saving the same step: keep the old one until the new is in place
        backup = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(final_dir, backup)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_dir(root)
    write_atomic(root / LATEST, (final_dir.name + "\n").encode())
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).exists() and p.suffix == "")
    for old in done[:-keep]:
        if old != final_dir:
            shutil.rmtree(old, ignore_errors=True)
            logger.info("removed old checkpoint %s", old)


def resolve_checkpoint(spec: str | None, root: Path) -> Path | None:
    """``None`` -> no resume; ``"auto"`` -> the latest complete checkpoint in ``root`` (or None);
    anything else -> that path, which must hold a checkpoint."""
    if spec is None:
        return None
    if spec == "auto":
        latest = root / LATEST
        if not latest.exists():
            return None
        name = latest.read_text().strip()
        path = root / name
        if not (path / MANIFEST).exists():
            raise CheckpointError(f"{latest} points at {path}, which is not a complete checkpoint")
        return path
    path = Path(spec)
    if path.is_dir() and not (path / MANIFEST).exists() and (path / LATEST).exists():
        path = path / (path / LATEST).read_text().strip()
    if not path.exists():
        raise CheckpointError(f"checkpoint to resume from not found: {spec}")
    return path
