"""The deployable inference package: dense weights, expert sections, static graphs, manifest.

Layout of a package directory::

    manifest.json            format, model config, MoE layer order, every file with SHA-256
    dense.npz                all dense parameters (embeddings, attention, norms, routers, dense FFNs)
    experts/layer_XX.bin     one section per MoE layer: w1, b1, w2, b2 of all E experts, raw
                             float32, each tensor at a 4096-byte aligned offset, file size a
                             multiple of 4096 (O_DIRECT-readable straight into an aligned slot)
    graphs/*.json|.pdiparams Paddle static sub-graphs for Paddle Inference (see predictor.py)

Loading verifies the SHA-256 of every file it will serve from, once, and refuses the package
naming the file if one is missing, truncated or corrupt; sections are re-checked (size and
mtime) before every disk read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paddle_semoe.engine.checkpoint import CheckpointError, write_atomic
from paddle_semoe.engine.checkpoint import verify_file as checkpoint_verify_file

logger = logging.getLogger(__name__)

FORMAT = "paddle-semoe-inference/1"
ALIGN = 4096
EXPERT_TENSORS = ("w1", "b1", "w2", "b2")


class PackageError(CheckpointError):
    """An inference package is missing, corrupt or inconsistent."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int  # byte offset inside the section file (multiple of ALIGN)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Section:
    """The experts of one MoE layer on disk."""

    layer: int  # block index in the model
    file: str  # relative to the package root
    nbytes: int  # file size (aligned)
    sha256: str
    tensors: tuple[TensorSpec, ...]

    @property
    def payload_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def section_layout(shapes: dict[str, tuple[int, ...]], dtype: str = "float32") -> tuple[tuple[TensorSpec, ...], int]:
    """Aligned offsets of the expert tensors in a section and the section's file size."""
    specs, off = [], 0
    for name in EXPERT_TENSORS:
        spec = TensorSpec(name, tuple(int(s) for s in shapes[name]), dtype, off)
        specs.append(spec)
        off = _align(off + spec.nbytes)
    return tuple(specs), max(off, ALIGN)


def write_section(path: Path, arrays: dict[str, np.ndarray]) -> tuple[tuple[TensorSpec, ...], int, str]:
    specs, size = section_layout({k: v.shape for k, v in arrays.items()}, str(arrays["w1"].dtype))
    buf = bytearray(size)
    for s in specs:
        data = np.ascontiguousarray(arrays[s.name]).tobytes()
        buf[s.offset : s.offset + len(data)] = data
    write_atomic(path, bytes(buf))
    return specs, size, hashlib.sha256(buf).hexdigest()


@dataclass(frozen=True)
class Manifest:
    root: Path
    model: dict[str, Any]
    sections: tuple[Section, ...]  # in MoE layer order
    dense_file: str
    dense_sha256: str
    graphs: dict[str, Any]

    def section(self, layer: int) -> Section:
        for s in self.sections:
            if s.layer == layer:
                return s
        raise PackageError(f"package {self.root} has no expert section for layer {layer}")

    @property
    def max_section_bytes(self) -> int:
        return max((s.nbytes for s in self.sections), default=0)

    @property
    def expert_bytes(self) -> int:
        return sum(s.nbytes for s in self.sections)


def write_manifest(root: Path, model: dict, sections: list[Section], dense_sha256: str, graphs: dict) -> None:
    doc = {
        "format": FORMAT,
        "model": model,
        "moe_layers": [s.layer for s in sections],
        "sections": [
            {**asdict(s), "tensors": [{**asdict(t), "shape": list(t.shape)} for t in s.tensors]} for s in sections
        ],
        "dense": {"file": "dense.npz", "sha256": dense_sha256},
        "graphs": graphs,
    }
    write_atomic(root / "manifest.json", json.dumps(doc, indent=2).encode())


def read_manifest(root: Path | str, verify: bool = True) -> Manifest:
    """Load a package manifest; with ``verify``, check every referenced file's SHA-256."""
    root = Path(root)
    mpath = root / "manifest.json"
    if not mpath.exists():
        raise PackageError(f"inference package not found: {mpath} does not exist")
    try:
        doc = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise PackageError(f"inference manifest {mpath} is corrupt: {exc}") from exc
    if doc.get("format") != FORMAT:
        raise PackageError(f"{mpath} has format {doc.get('format')!r}, expected {FORMAT!r}")
    sections = tuple(
        Section(
            layer=int(s["layer"]), file=s["file"], nbytes=int(s["nbytes"]), sha256=s["sha256"],
            tensors=tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"], int(t["offset"])) for t in s["tensors"]),
        )
        for s in doc["sections"]
    )
    m = Manifest(root, doc["model"], sections, doc["dense"]["file"], doc["dense"]["sha256"], doc.get("graphs", {}))
    if verify:
        verify_file(root / m.dense_file, m.dense_sha256, None)
        for s in sections:
            verify_file(root / s.file, s.sha256, s.nbytes)
    return m


def verify_file(path: Path, sha256: str, nbytes: int | None) -> None:
    checkpoint_verify_file(path, sha256, nbytes, kind="inference package", error=PackageError)


def load_dense(m: Manifest) -> dict[str, np.ndarray]:
    with np.load(m.root / m.dense_file, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def section_views(buffer: np.ndarray, section: Section) -> dict[str, np.ndarray]:
    """Typed views of the expert tensors inside a raw (uint8) section buffer."""
    out = {}
    for t in section.tensors:
        raw = buffer[t.offset : t.offset + t.nbytes]
        out[t.name] = raw.view(np.dtype(t.dtype)).reshape(t.shape)
    return out


class SectionFile:
    """Reads one section into caller-provided aligned memory; ``direct`` bypasses the page cache.

    ``direct=True`` uses O_DIRECT (real disk reads every time); where the file system refuses
    it, the page cache is dropped for the file after each read instead (logged once).
    """

    def __init__(self, root: Path, section: Section, direct: bool):
        self.path = root / section.file
        self.section = section
        self.direct = direct
        st = self.path.stat()
        self._stamp = (st.st_size, st.st_mtime_ns)
        self._fadvise_only = False

    def _check_unchanged(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError as exc:
            raise PackageError(f"inference package file disappeared: {self.path}") from exc
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise PackageError(f"inference package file {self.path} changed after it was verified; refusing to serve it")

    def read_into(self, out: memoryview) -> int:
        """Read the whole section into ``out`` (>= nbytes, 4096-aligned). Returns bytes read."""
        self._check_unchanged()
        n = self.section.nbytes
        flags = os.O_RDONLY
        if self.direct and not self._fadvise_only:
            flags |= getattr(os, "O_DIRECT", 0)
        try:
            fd = os.open(self.path, flags)
        except OSError:
            if not self.direct:
                raise
            self._fadvise_only = True
            logger.warning("O_DIRECT refused for %s; reading buffered and dropping its page cache instead", self.path)
            fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < n:
                got = os.preadv(fd, [out[done:n]], done)
                if got <= 0:
                    raise PackageError(f"inference package file {self.path} ended after {done} of {n} bytes")
                done += got
            if self.direct and self._fadvise_only:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return n


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A zero-initialized uint8 array whose data pointer is 4096-aligned (for O_DIRECT)."""
    raw = np.zeros(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes]
