"""One run per output directory: a per-rank lock file under ``<output_dir>/.locks/``.

Each rank of a training job holds ``rank_XXXXX.lock`` with an exclusive ``flock`` for the whole
run; the file records who holds it (pid, host, start time). A second run on the same output
directory finds the lock held and is refused in one line naming the holder, before it writes
anything. The kernel releases a ``flock`` when its process dies (``kill -9`` included), so a
lock left by a dead run is stale by construction: the next run takes it over and logs whose it
was. ``flock`` works on local file systems and NFSv4; on a shared file system without it, two
runs on different hosts are not kept apart.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["LockHolder", "RunLock", "RunLockError", "lock_output_dir"]


class RunLockError(RuntimeError):
    """The output directory is in use by another run."""


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    started: str  # UTC, ISO 8601

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


def _read_holder(fd: int) -> LockHolder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b"".join(iter(lambda: os.read(fd, 4096), b""))
    try:
        doc = json.loads(raw.decode())
        return LockHolder(int(doc["pid"]), str(doc["host"]), str(doc["started"]))
    except (ValueError, KeyError, TypeError):
        return None


class RunLock:
    """A held lock; :meth:`release` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int, holder: LockHolder):
        self.path = path
        self.holder = holder
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a released lock names nobody
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def lock_output_dir(output_dir: Path | str, rank: int = 0) -> RunLock:
    """Take rank ``rank``'s lock of ``output_dir`` (created if missing); :class:`RunLockError`
    naming the holder when another live run has it."""
    lock_dir = Path(output_dir) / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"rank_{rank:05d}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        who = holder.describe() if holder is not None else "another process"
        raise RunLockError(
            f"output directory {output_dir} is in use by another run ({who}): wait for it to end, or pick another "
            "-o train.output_dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    stale = _read_holder(fd)
    if stale is not None:
        logger.warning("output directory %s: taking over the stale lock of a run that is gone (%s)", output_dir,
                       stale.describe())
    me = LockHolder(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(asdict(me)).encode())
    os.fsync(fd)
    return RunLock(path, fd, me)
