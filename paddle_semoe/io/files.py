"""Durable files: atomic writes, directory fsync, SHA-256, manifests of file records.

Every file this project persists (checkpoint shards and manifests, inference packages, the SSD
tier's index, saved configs) is written through :func:`write_atomic`: a unique temp name in the
same directory, ``fsync``, ``rename`` over the target, ``fsync`` of the directory. A reader
never sees a partial file, and a crash leaves the old content or the new one.

A manifest lists :class:`FileRecord` s (name relative to a root, SHA-256 hex, size in bytes);
:func:`verify_file` / :func:`verify_records` refuse a missing, truncated or corrupt file with
an error naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = [
    "FileRecord", "IntegrityError", "fsync_dir", "record_of", "records_from_json", "records_to_json", "sha256_bytes",
    "sha256_file", "sha256_from_words", "sha256_to_words", "verify_file", "verify_records", "write_atomic",
]


class IntegrityError(RuntimeError):
    """A persisted file is missing, truncated, corrupt or of the wrong format."""


@dataclass(frozen=True)
class FileRecord:
    """One file of a manifest: ``name`` relative to the manifest's root, ``sha256`` (64 hex
    characters) and size in ``bytes``."""

    name: str
    sha256: str
    bytes: int


def fsync_dir(path: Path | str) -> None:
    """Make renames inside directory ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path | str, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` via a unique temp file in the same directory, fsync, rename.

    The temp file is removed when writing fails; ``fsync=False`` skips both fsyncs (scratch data).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of a buffer."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_of(path: Path | str, name: str | None = None) -> FileRecord:
    """The record of an existing file (``name`` defaults to the file's base name)."""
    path = Path(path)
    return FileRecord(name or path.name, sha256_file(path), path.stat().st_size)


def sha256_to_words(hexdigest: str) -> np.ndarray:
    """A hex SHA-256 as int64 [4] (big-endian words), for integer collectives."""
    return np.frombuffer(bytes.fromhex(hexdigest), dtype=">u8").astype(np.uint64).view(np.int64)


def sha256_from_words(words: np.ndarray) -> str:
    """Inverse of :func:`sha256_to_words`."""
    return np.asarray(words, dtype=np.int64).view(np.uint64).astype(">u8").tobytes().hex()


def records_to_json(records: Iterable[FileRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]


def records_from_json(items: Iterable[Mapping[str, Any]]) -> dict[str, FileRecord]:
    """``{name: record}`` from the JSON list written by :func:`records_to_json`."""
    return {str(f["name"]): FileRecord(str(f["name"]), str(f["sha256"]), int(f["bytes"])) for f in items}


def verify_file(
    path: Path | str, sha256: str, nbytes: int | None, kind: str = "checkpoint", error: type[Exception] = IntegrityError
) -> None:
    """Refuse a file that is missing, has the wrong size (``nbytes``; ``None``: unchecked) or the
    wrong SHA-256, raising ``error`` with a message naming the file and its ``kind``."""
    path = Path(path)
    if not path.exists():
        raise error(f"{kind} file missing: {path}")
    size = path.stat().st_size
    if nbytes is not None and size != nbytes:
        raise error(f"{kind} file {path} is truncated or altered: {size} bytes, manifest says {nbytes}")
    if sha256_file(path) != sha256:
        raise error(f"{kind} file {path} is corrupt: SHA-256 does not match the manifest")


def verify_records(
    root: Path | str, records: Iterable[FileRecord], kind: str = "checkpoint", error: type[Exception] = IntegrityError
) -> None:
    """:func:`verify_file` for every record, relative to ``root``."""
    for rec in records:
        verify_file(Path(root) / rec.name, rec.sha256, rec.bytes, kind, error)
