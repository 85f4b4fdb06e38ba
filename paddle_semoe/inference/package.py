"""The deployable inference package: dense weights, expert sections, static graphs, manifest.

Layout of a package directory::

    manifest.json            format, model config, MoE layer order, every file with SHA-256
    dense.npz                all dense parameters (embeddings, attention, norms, routers, dense FFNs)
    experts/layer_XX.bin     one section per MoE layer: w1, b1, w2, b2 of all E experts, raw
                             float32, each tensor at a 4096-byte aligned offset, file size a
                             multiple of 4096 (O_DIRECT-readable straight into an aligned slot).
                             Expert e of the layer is addressable on its own: its rows of each
                             tensor are one contiguous range (``expert_ranges``); the w1/w2
                             ranges are 4096-aligned whenever D*F*4 is a multiple of 4096, and
                             format 2 records a CRC-32 per expert (``expert_crc32``).
    graphs/*.json|.pdiparams Paddle static sub-graphs for Paddle Inference (see predictor.py)

Every file but the manifest itself is recorded in it (the graphs and tokenizer under ``files``).

Loading verifies the SHA-256 of every file it will serve from, once, and refuses the package
naming the file if one is missing, truncated or corrupt; sections are re-checked (size and
mtime) before every disk read.
"""

from __future__ import annotations

import json
import logging
import dataclasses
import os
import threading
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from paddle_semoe.io.checkpoint import CheckpointError
from paddle_semoe.io.files import FileRecord, sha256_bytes, verify_file as _verify_file, write_atomic

logger = logging.getLogger(__name__)

FORMAT = "paddle-semoe-inference/2"
FORMAT_V1 = "paddle-semoe-inference/1"  # same files, no per-expert checksums (derived on load)
READABLE_FORMATS = (FORMAT_V1, FORMAT)
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
    expert_crc32: tuple[int, ...] = ()  # per expert: CRC-32 of its w1 rows then its w2 rows

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise PackageError(f"section {self.file} has no tensor {name!r}")

    def expert_range(self, name: str, e: int) -> tuple[int, int]:
        """``(file offset, nbytes)`` of expert ``e``'s slice of tensor ``name`` (leading dim E)."""
        t = self.tensor(name)
        if not 0 <= e < t.shape[0]:
            raise PackageError(f"section {self.file}: expert {e} out of range [0, {t.shape[0]})")
        per = t.nbytes // t.shape[0]
        return t.offset + e * per, per


def expert_checksums(w1: np.ndarray, w2: np.ndarray) -> tuple[int, ...]:
    """CRC-32 per expert of ``w1[e]`` bytes followed by ``w2[e]`` bytes (w1 [E,D,F], w2 [E,F,D])."""
    return tuple(
        zlib.crc32(np.ascontiguousarray(w2[e]).tobytes(), zlib.crc32(np.ascontiguousarray(w1[e]).tobytes()))
        for e in range(w1.shape[0])
    )


def _write_arrays(path: Path,
                  arrays: dict[str, np.ndarray]) -> tuple[tuple[TensorSpec, ...], int, str]:
    """A section file: the arrays in order, each at a 4096-aligned offset, the file size a
    multiple of 4096; returns (specs, size, sha256)."""
    specs, off = [], 0
    for name, a in arrays.items():
        specs.append(TensorSpec(name, tuple(int(d) for d in a.shape), str(a.dtype), off))
        off = _align(off + specs[-1].nbytes)
    buf = bytearray(max(off, ALIGN))
    for spec in specs:
        data = np.ascontiguousarray(arrays[spec.name]).tobytes()
        buf[spec.offset : spec.offset + len(data)] = data
    write_atomic(path, bytes(buf))
    return tuple(specs), len(buf), sha256_bytes(buf)


def write_section(path: Path, arrays: dict[str, np.ndarray]) -> tuple[tuple[TensorSpec, ...], int, str]:
    """A float32 expert section: w1, b1, w2, b2 of ``arrays``; returns (specs, size, sha256)."""
    return _write_arrays(path, {k: arrays[k] for k in EXPERT_TENSORS})


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weight-only int8 per output channel: ``w [E, K, N]`` (x @ w[e] maps K -> N)
    -> ``(q int8 [E, K, N], scale float32 [E, N])`` with ``w ~= q * scale[:, None, :]``."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None, :]), -127, 127).astype(np.int8)
    return q, scale


INT4_GROUP = 32  # int4 scales: one per output channel and group of 32 consecutive input rows


def quantize_int4(w: np.ndarray, group: int = INT4_GROUP) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weight-only int4, per output channel and group of ``group`` input rows:
    ``w [E, K, N]`` (N even) -> ``(packed uint8 [E, K, N/2], scale float32 [E, ceil(K/group), N])``
    with ``w[e, k, n] ~= q[e, k, n] * scale[e, k // group, n]``, q in [-7, 7]; byte ``[e, k, m]``
    holds column 2m in its low nibble and 2m+1 in its high nibble (two's complement)."""
    E, K, N = w.shape
    if N % 2:
        raise ValueError(f"int4 packs two output columns per byte: the output dim must be even, got {N}")
    if group < 1:
        raise ValueError(f"int4 group must be >= 1, got {group}")
    ng = -(-K // group)
    padded = np.zeros((E, ng * group, N), np.float32)
    padded[:, :K] = w
    amax = np.abs(padded).reshape(E, ng, group, N).max(axis=2)
    scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / np.repeat(scale, group, axis=1)[:, :K]), -7, 7).astype(np.int8)
    packed = ((q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)).astype(np.uint8)
    return packed, scale


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """``uint8 [..., N/2]`` -> the int8 values ``[..., N]`` :func:`quantize_int4` packed."""
    lo = (packed.astype(np.int16) << 12).astype(np.int16) >> 12
    hi = packed.view(np.int8).astype(np.int16) >> 4
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.int8)
    out[..., 0::2] = lo
    out[..., 1::2] = hi
    return out


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, group: int = INT4_GROUP) -> np.ndarray:
    """float32 ``[E, K, N]``: the weights an int4 section stands for (``q * scale`` per group)."""
    q = unpack_int4(packed)
    return q * np.repeat(scale, group, axis=1)[:, : q.shape[1]]


def write_quantized_section(path: Path, w1: np.ndarray, w2: np.ndarray, quant: str
                            ) -> tuple[tuple[TensorSpec, ...], int, str, tuple[int, ...]]:
    """A weight-only ``quant`` (``int8`` or ``int4``) expert section: quantized ``w1``/``w2``
    (each expert's rows one contiguous range) and their scales (:func:`quantize_int8` /
    :func:`quantize_int4`); returns (specs, size, sha256, per-expert CRC-32 of the quantized
    w1/w2 rows). Biases stay in the float32 section."""
    quantize = quantize_int8 if quant == "int8" else quantize_int4
    (q1, s1), (q2, s2) = quantize(w1), quantize(w2)
    specs, size, sha = _write_arrays(path, {"w1": q1, "w1_scale": s1, "w2": q2, "w2_scale": s2})
    return specs, size, sha, expert_checksums(q1, q2)


@dataclass(frozen=True)
class Manifest:
    root: Path
    model: dict[str, Any]
    sections: tuple[Section, ...]  # in MoE layer order
    dense_file: str
    dense_sha256: str
    graphs: dict[str, Any]
    int8_sections: tuple[Section, ...] = ()  # optional weight-only int8 copies, same layer order
    int4_sections: tuple[Section, ...] = ()  # optional weight-only int4 copies (groups of INT4_GROUP rows)

    @property
    def max_section_bytes(self) -> int:
        return max((s.nbytes for s in self.sections), default=0)

    @property
    def expert_bytes(self) -> int:
        return sum(s.nbytes for s in self.sections)


def _section_doc(s: Section) -> dict:
    return {**asdict(s), "tensors": [{**asdict(t), "shape": list(t.shape)} for t in s.tensors]}


def _section_of(s: dict) -> Section:
    return Section(
        layer=int(s["layer"]), file=s["file"], nbytes=int(s["nbytes"]), sha256=s["sha256"],
        tensors=tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"], int(t["offset"])) for t in s["tensors"]),
        expert_crc32=tuple(int(c) for c in s.get("expert_crc32", ())),
    )


def write_manifest(
    root: Path, model: dict, sections: list[Section], dense_sha256: str, graphs: dict, extra_files: Sequence[FileRecord] = (),
    int8_sections: Sequence[Section] = (), int4_sections: Sequence[Section] = (),
) -> None:
    """``extra_files``: further files the package carries (e.g. ``tokenizer/...``), verified on load;
    ``int8_sections`` / ``int4_sections``: weight-only int8 / int4 copies of the expert sections (optional)."""
    doc = {
        "format": FORMAT,
        "model": model,
        "moe_layers": [s.layer for s in sections],
        "sections": [_section_doc(s) for s in sections],
        "int8_sections": [_section_doc(s) for s in int8_sections],
        "int4_sections": [_section_doc(s) for s in int4_sections],
        "dense": {"file": "dense.npz", "sha256": dense_sha256},
        "graphs": graphs,
        "files": [asdict(r) for r in extra_files],
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
    fmt = doc.get("format")
    if fmt not in READABLE_FORMATS:
        raise PackageError(f"{mpath} has format {fmt!r}; this version reads {' and '.join(map(repr, READABLE_FORMATS))}")
    try:
        sections = tuple(_section_of(s) for s in doc["sections"])
        int8 = tuple(_section_of(s) for s in doc.get("int8_sections", []))
        int4 = tuple(_section_of(s) for s in doc.get("int4_sections", []))
        m = Manifest(root, doc["model"], sections, doc["dense"]["file"], doc["dense"]["sha256"], doc.get("graphs", {}), int8,
                     int4)
        files = [(str(f["name"]), str(f["sha256"]), int(f["bytes"])) for f in doc.get("files", [])]
        for key in ("vocab_size", "max_seq_len", "d_model"):  # what every reader of the model config needs
            int(m.model[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"inference manifest {mpath} is missing or has a malformed entry {exc}: re-export the package") from exc
    if verify:
        verify_file(root / m.dense_file, m.dense_sha256, None)
        for s in sections + int8 + int4:
            verify_file(root / s.file, s.sha256, s.nbytes)
        for name, sha, nbytes in files:
            verify_file(root / name, sha, nbytes)
        _check_graphs_recorded(mpath, m.graphs, {name for name, _, _ in files})
        if fmt == FORMAT_V1:  # format 1 has no per-expert checksums: derive them from the verified files
            m = dataclasses.replace(m, sections=tuple(_with_expert_checksums(root, s) for s in sections))
    return m


def _check_graphs_recorded(mpath: Path, graphs: dict[str, Any], recorded: set[str]) -> None:
    """Refuse a package whose static graphs (every file prefix of the graph index:
    ``graphs/embed``, ...) have no checksums in the manifest (exported by an older version):
    they could not be verified before Paddle Inference loads them."""
    prefixes: list[str] = []
    for key, value in graphs.items():
        if key == "blocks":
            prefixes += [str(v) for b in value for k, v in b.items() if k != "kind"]
        elif not isinstance(value, bool):  # a bool is a flag ("kv_cache"), not a file
            prefixes.append(str(value))
    for prefix in prefixes:
        if not any(name.startswith(prefix + ".") for name in recorded):
            raise PackageError(
                f"inference manifest {mpath} records no checksum for the static graph {prefix}: it cannot be verified; "
                "re-export the package"
            )


def _with_expert_checksums(root: Path, s: Section) -> Section:
    v = section_views(np.fromfile(root / s.file, dtype=np.uint8), s)
    return dataclasses.replace(s, expert_crc32=expert_checksums(v["w1"], v["w2"]))


def verify_file(path: Path, sha256: str, nbytes: int | None) -> None:
    _verify_file(path, sha256, nbytes, kind="inference package", error=PackageError)


def load_dense(m: Manifest) -> dict[str, np.ndarray]:
    with np.load(m.root / m.dense_file, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def section_views(buffer: np.ndarray, section: Section) -> dict[str, np.ndarray]:
    """Typed views of the expert tensors inside a raw (uint8) section buffer."""
    return {t.name: buffer[t.offset : t.offset + t.nbytes].view(np.dtype(t.dtype)).reshape(t.shape)
            for t in section.tensors}


class PackageFile:
    """One file of a verified package, read with ``pread`` into caller memory (one descriptor,
    opened on the first read).

    Every read first checks that the file's size and mtime are those it had when this object was
    made, else refuses naming it. ``direct``: O_DIRECT, so the page cache never serves a read;
    ranges whose offset, length or destination are not 4096-aligned are read as their covering
    pages through this thread's bounce buffer. Where the file system refuses O_DIRECT, reads are
    buffered and the file's page cache is dropped after each one (logged once).
    """

    def __init__(self, path: Path, direct: bool):
        self.path, self.direct = path, direct
        st = path.stat()
        self._stamp = (st.st_size, st.st_mtime_ns)
        self._fd: int | None = None
        self._fadvise = False
        self._warned_bounce = False
        self._lock = threading.Lock()

    def _open(self) -> int:
        with self._lock:
            if self._fd is None:
                direct = getattr(os, "O_DIRECT", 0) if self.direct else 0
                try:
                    self._fd = os.open(self.path, os.O_RDONLY | direct)
                except OSError:
                    if not self.direct:
                        raise
                    self._fadvise = True
                    logger.warning("O_DIRECT refused for %s; reading buffered and dropping its "
                                   "page cache instead", self.path)
                    self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def read(self, offset: int, out: np.ndarray) -> None:
        """Fill ``out`` (uint8) with the file's ``out.nbytes`` bytes from ``offset``."""
        try:
            st = self.path.stat()
        except FileNotFoundError as exc:
            raise PackageError(f"inference package file disappeared: {self.path}") from exc
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise PackageError(f"inference package file {self.path} changed after it was verified; refusing to serve it")
        fd = self._fd if self._fd is not None else self._open()
        n = out.nbytes
        target, start, length = out, offset, n
        unaligned = offset % ALIGN or n % ALIGN or out.ctypes.data % ALIGN
        if self.direct and not self._fadvise and unaligned:
            if not self._warned_bounce:
                logger.info("%s: unaligned ranges read via an O_DIRECT bounce buffer", self.path)
                self._warned_bounce = True
            start = offset // ALIGN * ALIGN
            length = _align(offset + n) - start
            target = _bounce(length)
        mv = target.data.cast("B")
        done = 0
        while done < length:
            got = os.preadv(fd, [mv[done:length]], start + done)
            if got <= 0:
                raise PackageError(f"inference package file {self.path} ended at byte {start+done}")
            done += got
        if target is not out:
            np.copyto(out, target[offset - start : offset - start + n])
        if self._fadvise:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


_local = threading.local()  # per thread: the O_DIRECT bounce buffer


def _bounce(nbytes: int) -> np.ndarray:
    """This thread's 4096-aligned bounce buffer, at least ``nbytes`` (grown when needed)."""
    b = getattr(_local, "bounce", None)
    if b is None or b.size < nbytes:
        b = _local.bounce = aligned_buffer(nbytes)
    return b[:nbytes]


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A zero-initialized uint8 array whose data pointer is 4096-aligned (for O_DIRECT)."""
    raw = np.zeros(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes]
