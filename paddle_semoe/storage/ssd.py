"""The SSD tier: one file per expert state, replaced atomically, checksummed.

File ``l<layer>_e<global expert>.bin`` = a 4096-byte header (magic, layer, global expert,
section size, payload CRC-32, write sequence number, header CRC-32) + the padded state payload
of :mod:`paddle_semoe.storage.layout`. A file is never written in place: ``<name>.tmp``,
fsync, rename, fsync the directory, so a crash leaves the old or the new complete file (plus
perhaps a partial ``.tmp`` that :meth:`SSDTier.recover` deletes); files only ever replaced make
a checkpoint a set of hard links (:meth:`SSDTier.snapshot`). Every read checks both CRCs and
names the file when they do not match. I/O uses O_DIRECT (4096-aligned buffers and sizes);
where the filesystem refuses it, one loud warning, then buffered I/O + ``posix_fadvise``.

Fault injection for tests: ``SEMOE_STORAGE_FAULT=kill_in_writeback:N`` SIGKILLs the process
halfway through its N-th write-back (after half the bytes reached the ``.tmp`` file).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import signal
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


from paddle_semoe.io.files import fsync_dir
from paddle_semoe.storage.layout import BLOCK, ExpertStateLayout

logger = logging.getLogger(__name__)

MAGIC = b"SEMOEXS1"
VERSION = 1
_HEADER = struct.Struct("<8sIIIQQIQ")  # magic, version, layer, expert, numel, payload_bytes, payload_crc, seq
_HEADER_CRC = struct.Struct("<I")
FAULT_ENV = "SEMOE_STORAGE_FAULT"


class StorageError(RuntimeError):
    """An expert state file is missing, truncated, corrupt or does not match the job."""


@dataclass(frozen=True)
class FileInfo:
    """What a state file holds (from its verified header)."""

    name: str
    layer: int
    expert: int  # global expert index
    crc32: int  # of the payload
    bytes: int  # file size
    seq: int


def state_file_name(layer: int, expert: int) -> str:
    return f"l{layer:03d}_e{expert:06d}.bin"


def _parse_fault(spec: str | None) -> int:
    """Write-back number at which to SIGKILL (0: never)."""
    if not spec:
        return 0
    kind, _, n = spec.partition(":")
    if kind != "kill_in_writeback" or not n.isdigit() or int(n) < 1:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected 'kill_in_writeback:N' with N >= 1")
    return int(n)


class SSDTier:
    """Per-expert state files of one rank.

    Args:
        root: directory (created); holds only this rank's files.
        layout: the expert state layout (payload size).
        o_direct: use O_DIRECT.
        fsync: make each write durable before it replaces the old file.
        verify: check CRCs on every read.
    """

    def __init__(self, root: Path, layout: ExpertStateLayout, *, o_direct: bool = True, fsync: bool = True, verify: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.layout = layout
        self.payload_bytes = layout.slot_bytes
        self.file_bytes = BLOCK + self.payload_bytes
        self.fsync = fsync
        self.verify = verify
        self.o_direct = o_direct and hasattr(os, "O_DIRECT")
        self._header = mmap.mmap(-1, BLOCK)  # I/O header buffer (mmap: page-aligned for O_DIRECT)
        self._scratch: mmap.mmap | None = None
        self._writebacks = 0
        self._kill_at = _parse_fault(os.environ.get(FAULT_ENV))
        self._copy_logged = False
        self._lock = threading.Lock()  # one I/O at a time: the header/scratch buffers are shared

    # ------------------------------------------------------------------ files
    def path(self, layer: int, expert: int) -> Path:
        return self.root / state_file_name(layer, expert)

    def recover(self) -> int:
        """Delete partial ``.tmp`` files a crash left behind; returns how many."""
        n = 0
        for p in self.root.glob("*.tmp"):
            p.unlink()
            n += 1
        if n:
            logger.warning("expert store %s: removed %d partial file(s) left by an interrupted write-back", self.root, n)
        return n

    def _open(self, path: Path, flags: int) -> int:
        if self.o_direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.o_direct = False  # never tried again: the warning below is logged once
                logger.warning(
                    "\n%s\nexpert store %s: the filesystem refuses O_DIRECT; FALLING BACK to "
                    "buffered I/O + posix_fadvise(DONTNEED) (reads may come from the page "
                    "cache)\n%s", "!" * 78, self.root, "!" * 78,
                )
        return os.open(path, flags, 0o644)

    def _drop_cache(self, fd: int) -> None:
        if not self.o_direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _pack_header(self, layer: int, expert: int, crc: int, seq: int) -> None:
        head = _HEADER.pack(MAGIC, VERSION, layer, expert, self.layout.numel, self.payload_bytes, crc, seq)
        hcrc = _HEADER_CRC.pack(zlib.crc32(head))
        self._header[:] = b"\0" * BLOCK
        self._header[: len(head) + 4] = head + hcrc

    def _check_header(self, buf, where: Path, layer: int | None, expert: int | None) -> tuple[int, int, int, int]:
        raw = bytes(buf[: _HEADER.size + 4])
        head, (hcrc,) = raw[: _HEADER.size], _HEADER_CRC.unpack(raw[_HEADER.size :])
        magic, version, f_layer, f_expert, numel, payload, crc, seq = _HEADER.unpack(head)
        if magic != MAGIC:
            raise StorageError(f"expert state file {where} is not a paddle-semoe state (bad magic {magic!r})")
        if zlib.crc32(head) != hcrc:
            raise StorageError(f"expert state file {where} is corrupt: header checksum mismatch")
        if version != VERSION or numel != self.layout.numel or payload != self.payload_bytes:
            raise StorageError(
                f"expert state file {where} does not match the model: version {version}, {numel} floats per section "
                f"(model: {self.layout.numel}), payload {payload} bytes"
            )
        if (layer is not None and f_layer != layer) or (expert is not None and f_expert != expert):
            raise StorageError(f"expert state file {where} holds layer {f_layer} expert {f_expert}, expected layer {layer} expert {expert}")
        return f_layer, f_expert, crc, seq

    def write(self, layer: int, expert: int, payload: memoryview, seq: int, *, writeback: bool = True) -> FileInfo:
        """Atomically replace the state file of (layer, expert) with ``payload``.

        Args:
            payload: ``payload_bytes`` bytes, 4096-aligned address (a cache slot or mmap buffer).
            seq: write sequence number recorded in the header (the optimizer step).
            writeback: counts toward the fault-injection trigger.
        """
        if len(payload) != self.payload_bytes:
            raise ValueError(f"payload must be {self.payload_bytes} bytes, got {len(payload)}")
        with self._lock:
            return self._write_locked(layer, expert, payload, seq, writeback)

    def _write_locked(self, layer: int, expert: int, payload: memoryview, seq: int, writeback: bool) -> FileInfo:
        crc = zlib.crc32(payload)
        self._pack_header(layer, expert, crc, seq)
        final = self.path(layer, expert)
        tmp = final.with_name(final.name + ".tmp")
        fd = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            if writeback:
                self._writebacks += 1
                if self._kill_at and self._writebacks == self._kill_at:
                    half = (self.payload_bytes // 2) // BLOCK * BLOCK
                    os.pwritev(fd, [self._header, payload[:half]], 0)
                    os.fsync(fd)
                    logger.error("fault injection (%s): SIGKILL during write-back #%d of %s", FAULT_ENV, self._writebacks, final.name)
                    os.kill(os.getpid(), signal.SIGKILL)
            done = 0
            bufs = [memoryview(self._header), payload]
            while done < self.file_bytes:  # pwritev may write less than asked
                n = os.pwritev(fd, bufs, done)
                done += n
                bufs = _advance(bufs, n)
            if self.fsync:
                os.fsync(fd)
            self._drop_cache(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        if self.fsync:
            fsync_dir(self.root)
        return FileInfo(final.name, layer, expert, crc, self.file_bytes, seq)

    def read(self, layer: int, expert: int, payload: memoryview) -> FileInfo:
        """Read (layer, expert)'s state into ``payload`` (4096-aligned), verifying it."""
        path = self.path(layer, expert)
        with self._lock:
            return self._read_into(path, payload, layer, expert, verify=self.verify)

    def _read_into(self, path: Path, payload: memoryview, layer: int | None, expert: int | None, verify: bool) -> FileInfo:
        try:
            fd = self._open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StorageError(f"expert state file missing: {path}") from None
        try:
            size = os.fstat(fd).st_size
            if size != self.file_bytes:
                raise StorageError(f"expert state file {path} is truncated or altered: {size} bytes, expected {self.file_bytes}")
            done = 0
            bufs = [memoryview(self._header), payload]
            while done < self.file_bytes:
                n = os.preadv(fd, bufs, done)
                if n == 0:
                    raise StorageError(f"expert state file {path}: unexpected end of file at byte {done}")
                done += n
                bufs = _advance(bufs, n)
            self._drop_cache(fd)
        finally:
            os.close(fd)
        f_layer, f_expert, crc, seq = self._check_header(self._header, path, layer, expert)
        if verify:
            got = zlib.crc32(payload)
            if got != crc:
                raise StorageError(f"expert state file {path} is corrupt: payload CRC-32 {got:08x} != header {crc:08x}")
        return FileInfo(path.name, f_layer, f_expert, crc, self.file_bytes, seq)

    def verify_file(self, path: Path, layer: int | None = None, expert: int | None = None) -> FileInfo:
        """Read a whole state file and check both checksums (into a private scratch buffer)."""
        with self._lock:
            if self._scratch is None:
                self._scratch = mmap.mmap(-1, self.payload_bytes)
            return self._read_into(Path(path), memoryview(self._scratch)[: self.payload_bytes], layer, expert, verify=True)

    def release_scratch(self) -> None:
        """Free the verification buffer (one payload) after a bulk verification."""
        with self._lock:
            if self._scratch is not None:
                self._scratch.close()
                self._scratch = None

    def verify_all(self, keys: Iterable[tuple[int, int]]) -> list[FileInfo]:
        """Verify every (layer, global expert) file; raises :class:`StorageError` on the first bad one."""
        return [self.verify_file(self.path(l, e), l, e) for l, e in keys]

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self, dst: Path, keys: Iterable[tuple[int, int]]) -> list[FileInfo]:
        """Hard-link the current files of ``keys`` into ``dst`` (copy where links fail).

        The caller must have written back every dirty cache entry first. Returns the header
        information of each file (CRC from the header, not recomputed).
        """
        dst.mkdir(parents=True, exist_ok=True)
        infos = []
        for layer, expert in keys:
            src = self.path(layer, expert)
            target = dst / src.name
            self._link_or_copy(src, target)
            with open(target, "rb") as f:
                head = f.read(_HEADER.size + 4)
            _, _, crc, seq = self._check_header(head, target, layer, expert)
            infos.append(FileInfo(src.name, layer, expert, crc, target.stat().st_size, seq))
        return infos

    def restore(self, src: Path, expected: dict[str, int], keys: Iterable[tuple[int, int]]) -> None:
        """Replace this tier's files of ``keys`` by the verified files in ``src``.

        Args:
            src: a checkpoint's expert directory.
            expected: file name -> payload CRC-32 recorded at checkpoint time.
        """
        for layer, expert in keys:
            name = state_file_name(layer, expert)
            path = src / name
            if name not in expected:
                raise StorageError(f"checkpoint {src} has no expert state for layer {layer} expert {expert} in its index")
            info = self.verify_file(path, layer, expert)
            if info.crc32 != expected[name]:
                raise StorageError(
                    f"expert state file {path} does not match the checkpoint index: CRC-32 {info.crc32:08x} != {expected[name]:08x}"
                )
            if (self.root / name).exists() and os.path.samefile(path, self.root / name):
                continue  # already this very file (a hard link): renaming a link onto itself is a no-op
            tmp = self.root / (name + ".tmp")
            self._link_or_copy(path, tmp)
            os.replace(tmp, self.root / name)
        fsync_dir(self.root)

    def _link_or_copy(self, src: Path, dst: Path) -> None:
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except FileNotFoundError:
            raise StorageError(f"expert state file missing: {src}") from None
        except OSError as exc:
            if not self._copy_logged:
                self._copy_logged = True
                logger.warning(
                    "\n%s\nhard links unavailable from %s to %s (%s): FALLING BACK to copying expert state files "
                    "(checkpoints of the SSD tier become O(size))\n%s", "!" * 78, src.parent, dst.parent, exc, "!" * 78,
                )
            shutil.copyfile(src, dst)


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes of a buffer list (after a short read/write)."""
    for i, b in enumerate(bufs):
        if n < len(b):
            return [b[n:], *bufs[i + 1 :]]
        n -= len(b)
    return []
