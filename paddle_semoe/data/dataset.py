"""Prepared token datasets on disk: format, verification, memory-mapped views, document split.

A prepared dataset (written by :mod:`paddle_semoe.data.prepare` / ``tools/prepare_data.py``) is a
directory::

    manifest.json            written last: counts, dtype, sources (size + SHA-256), tokenizer,
                             every file below with its size and SHA-256, a dataset fingerprint
    tokens_00000.bin ...     token ids, raw little-endian ``uint16`` (vocabulary <= 65536) or
                             ``uint32``; the shards concatenated are one token stream
    doc_offsets.bin          ``int64[num_documents + 1]``: document ``d`` is the token range
                             ``[offsets[d], offsets[d + 1])`` of the stream (its EOS included)
    doc_sources.bin          ``int32[num_documents]``: index of each document's source file
    tokenizer/               the tokenizer (:mod:`paddle_semoe.data.subword` canonical form)

Opening a dataset (:class:`PreparedDataset`) checks every file's size and, by default, its
SHA-256 against the manifest, and refuses a truncated or altered file naming it. Tokens are
never loaded: shards are memory-mapped read-only (``MADV_RANDOM``, so reading a window does not
pull in read-ahead), and :class:`TokenView` presents any list of document ranges as one virtual
1-D token array with a vectorised :meth:`TokenView.take`, so training RSS does not grow with
the corpus (the document index costs 12 bytes per document).

Train/validation split (:meth:`PreparedDataset.split`): by whole documents, document ``d``
goes to validation when ``floor((d + 1) * f) > floor(d * f)``: every ``1/f``-th document,
spread evenly and blind to document size; at least one document on each side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .subword import TextTokenizer, TokenizerError, load_tokenizer_dir

__all__ = [
    "FORMAT",
    "MANIFEST",
    "DatasetError",
    "TokenView",
    "PreparedDataset",
    "token_dtype_for",
    "shard_name",
    "validation_mask",
]

logger = logging.getLogger(__name__)

FORMAT = "paddle-semoe-dataset/1"
MANIFEST = "manifest.json"
OFFSETS_FILE = "doc_offsets.bin"
SOURCES_FILE = "doc_sources.bin"
TOKENIZER_DIR = "tokenizer"


class DatasetError(ValueError):
    """A prepared dataset is missing, truncated, altered, or does not fit the job."""


def shard_name(index: int) -> str:
    return f"tokens_{index:05d}.bin"


def token_dtype_for(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    if vocab_size <= 0:
        raise DatasetError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def validation_mask(num_documents: int, val_fraction: float) -> np.ndarray:
    """``bool[num_documents]``: True for validation documents (every ``1/f``-th, spread evenly).

    Raises:
        DatasetError: ``val_fraction`` not in ``(0, 1)`` or fewer than two documents.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if num_documents < 2:
        raise DatasetError(f"a train/validation split needs at least 2 documents, the dataset has {num_documents}")
    d = np.arange(num_documents, dtype=np.float64)
    mask = np.floor((d + 1) * val_fraction) > np.floor(d * val_fraction)
    if not mask.any():
        mask[num_documents // 2] = True
    if mask.all():  # pragma: no cover - impossible for f < 1, kept as a guard
        mask[0] = False
    return mask


_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


class _Shards:
    """Read-only memory maps of a dataset's shards and their start positions in the stream."""

    def __init__(self, paths: Sequence[Path], dtype: np.dtype, counts: Sequence[int]) -> None:
        self.paths = [Path(p) for p in paths]
        self.dtype = np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)
        self._maps: List[Optional[np.ndarray]] = [None] * len(self.paths)
        self._mmaps: List[Optional[mmap.mmap]] = [None] * len(self.paths)

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def array(self, i: int) -> np.ndarray:
        """Shard ``i`` as a read-only memory-mapped ``dtype[count]`` array (mapped on first use)."""
        if self._maps[i] is None:
            with open(self.paths[i], "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                mm.madvise(mmap.MADV_RANDOM)
            self._mmaps[i] = mm
            self._maps[i] = np.frombuffer(mm, dtype=self.dtype)
        return self._maps[i]  # type: ignore[return-value]

    def take(self, positions: np.ndarray) -> np.ndarray:
        """``int64`` tokens at stream ``positions`` (any shape).

        The pages this touched are unmapped again afterwards (``MADV_DONTNEED``; they stay in
        the page cache): otherwise every window would leave ~64 KiB (the kernel's fault-around)
        mapped, and the resident set would grow towards the corpus size over an epoch.
        """
        flat = positions.reshape(-1)
        out = np.empty(flat.shape, dtype=np.int64)
        shard = np.searchsorted(self.starts, flat, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.array(int(s))[flat[sel] - self.starts[s]]
            mm = self._mmaps[int(s)]
            if mm is not None and _DONTNEED is not None:
                mm.madvise(_DONTNEED)
        return out.reshape(positions.shape)

    def read(self, start: int, count: int) -> np.ndarray:
        """``int64[count]`` tokens from ``start`` read through file I/O (no mapping, no RSS growth)."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            pos = start + done
            s = int(np.searchsorted(self.starts, pos, side="right") - 1)
            n = min(count - done, int(self.starts[s + 1]) - pos)
            with open(self.paths[s], "rb") as fh:
                fh.seek((pos - int(self.starts[s])) * self.dtype.itemsize)
                out[done : done + n] = np.fromfile(fh, dtype=self.dtype, count=n)
            done += n
        return out


class TokenView:
    """A virtual 1-D token array: the concatenation of document ranges of a dataset's stream.

    Duck-types the parts of a numpy array that :class:`~paddle_semoe.data.loader.TokenBatcher`
    and :func:`~paddle_semoe.data.loader.val_batches` use (``ndim``, ``size``, ``dtype``) plus
    :meth:`take`, which gathers without materialising the array.

    Args:
        shards: the dataset's memory-mapped shards.
        starts, lengths: ``int64[K]`` physical stream ranges, in view order.
        fingerprint: hex string identifying exactly these tokens (dataset + split), used instead
            of hashing the tokens on resume.
    """

    ndim = 1

    def __init__(self, shards: _Shards, starts: np.ndarray, lengths: np.ndarray, fingerprint: str) -> None:
        self._shards = shards
        self._phys = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        self._vstart = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.fingerprint = fingerprint

    @property
    def size(self) -> int:
        return int(self._vstart[-1])

    @property
    def dtype(self) -> np.dtype:
        return self._shards.dtype

    @property
    def num_segments(self) -> int:
        return int(self._phys.size)

    def _physical(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.size):
            raise IndexError(f"token index out of range [0, {self.size})")
        seg = np.searchsorted(self._vstart, index, side="right") - 1
        return self._phys[seg] + (index - self._vstart[seg])

    def take(self, index: np.ndarray) -> np.ndarray:
        """``int64`` tokens at virtual positions ``index`` (any shape, same shape out)."""
        return self._shards.take(self._physical(index))

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            return self.take(np.arange(start, stop, step, dtype=np.int64))
        return self.take(np.asarray(key))

    def iter_chunks(self, chunk_tokens: int = 1 << 20, limit: Optional[int] = None) -> Iterator[np.ndarray]:
        """``int64`` chunks of the view in order, read by file I/O (bounded memory)."""
        remaining = self.size if limit is None else min(limit, self.size)
        for seg in range(self.num_segments):
            if remaining <= 0:
                return
            pos, left = int(self._phys[seg]), int(self._vstart[seg + 1] - self._vstart[seg])
            while left > 0 and remaining > 0:
                n = min(left, chunk_tokens, remaining)
                yield self._shards.read(pos, n)
                pos += n
                left -= n
                remaining -= n

    def __repr__(self) -> str:
        return f"TokenView(size={self.size}, segments={self.num_segments}, dtype={self.dtype})"


def _merge_ranges(starts: np.ndarray, ends: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Merge physically adjacent ranges (``end[i] == start[i+1]``) into ``(starts, lengths)``."""
    if starts.size == 0:
        return starts, starts
    breaks = np.nonzero(starts[1:] != ends[:-1])[0] + 1
    first = np.concatenate([[0], breaks])
    last = np.concatenate([breaks - 1, [starts.size - 1]])
    return starts[first], ends[last] - starts[first]


@dataclass(frozen=True)
class FileEntry:
    name: str
    bytes: int
    sha256: str


class PreparedDataset:
    """A prepared dataset directory, verified against its manifest.

    Args:
        path: the dataset directory.
        verify: ``"full"`` (sizes and SHA-256 of every file; default), ``"size"`` (sizes only).

    Raises:
        DatasetError: missing directory or manifest, wrong format, or a file that is missing,
            truncated or altered (the message names the file and the dataset).
    """

    def __init__(self, path: Path, verify: str = "full") -> None:
        if verify not in ("full", "size"):
            raise DatasetError(f"verify must be 'full' or 'size', got {verify!r}")
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise DatasetError(f"prepared dataset not found: {self.path} (make one with tools/prepare_data.py)")
        if not mpath.is_file():
            raise DatasetError(f"{self.path} has no {MANIFEST}: not a prepared dataset (or its preparation did not finish)")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"dataset manifest {mpath} is corrupt: {err}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else None
            raise DatasetError(f"dataset {self.path} has format {got!r}, expected {FORMAT!r}")
        self.manifest: Dict[str, Any] = manifest
        self.files = {f["name"]: FileEntry(f["name"], int(f["bytes"]), f["sha256"]) for f in manifest["files"]}
        for entry in self.files.values():
            self._verify(entry, full=verify == "full")
        self.dtype = np.dtype(manifest["dtype"])
        self.num_tokens = int(manifest["num_tokens"])
        self.num_documents = int(manifest["num_documents"])
        self.fingerprint: str = manifest["fingerprint"]
        self.tokenizer_record: Dict[str, Any] = manifest["tokenizer"]
        shards = manifest["shards"]
        self._shards = _Shards([self.path / s["name"] for s in shards], self.dtype, [int(s["tokens"]) for s in shards])
        if self._shards.num_tokens != self.num_tokens:
            raise DatasetError(f"dataset {self.path}: shards hold {self._shards.num_tokens} tokens, manifest says {self.num_tokens}")
        self.offsets = np.fromfile(self.path / OFFSETS_FILE, dtype="<i8")
        if self.offsets.size != self.num_documents + 1 or self.offsets[0] != 0 or self.offsets[-1] != self.num_tokens:
            raise DatasetError(f"dataset {self.path}: {OFFSETS_FILE} does not match the manifest's document/token counts")

    def _verify(self, entry: FileEntry, full: bool) -> None:
        path = self.path / entry.name
        if not path.is_file():
            raise DatasetError(f"dataset {self.path}: file {entry.name} is missing")
        size = path.stat().st_size
        if size != entry.bytes:
            raise DatasetError(f"dataset file {path} is truncated or altered: {size} bytes, manifest says {entry.bytes}")
        if full:
            digest = _sha256_file(path)
            if digest != entry.sha256:
                raise DatasetError(f"dataset file {path} is altered: SHA-256 {digest[:12]}... != manifest {entry.sha256[:12]}...")

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (ids are below it)."""
        return int(self.tokenizer_record["vocab_size"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    def load_tokenizer(self) -> TextTokenizer:
        """The dataset's tokenizer, verified against the manifest's SHA-256."""
        try:
            return load_tokenizer_dir(self.tokenizer_dir, expect_sha256=self.tokenizer_record["sha256"])
        except TokenizerError as err:
            raise DatasetError(f"dataset {self.path}: {err}") from None

    def tokens(self) -> TokenView:
        """The whole token stream as a :class:`TokenView`."""
        return TokenView(self._shards, np.zeros(1, np.int64), np.array([self.num_tokens]), self.fingerprint)

    def split(self, val_fraction: float) -> Tuple[TokenView, TokenView]:
        """``(train, val)`` views split by whole documents (see the module docs)."""
        mask = validation_mask(self.num_documents, val_fraction)
        starts, ends = self.offsets[:-1], self.offsets[1:]
        views = []
        for name, sel in (("train", ~mask), ("val", mask)):
            s, n = _merge_ranges(starts[sel], ends[sel])
            tag = hashlib.sha256(f"{self.fingerprint}:{name}:{val_fraction!r}".encode()).hexdigest()
            views.append(TokenView(self._shards, s, n, tag))
        return views[0], views[1]

    def documents(self) -> Iterator[np.ndarray]:
        """Each document's ``int64`` tokens in order (file reads; for tools and tests)."""
        for d in range(self.num_documents):
            yield self._shards.read(int(self.offsets[d]), int(self.offsets[d + 1] - self.offsets[d]))

    def __repr__(self) -> str:
        return (
            f"PreparedDataset({str(self.path)!r}, {self.num_documents} documents, {self.num_tokens} tokens, "
            f"{self.dtype}, tokenizer {self.tokenizer_record.get('name')!r})"
        )


def dataset_summary(manifest: Mapping[str, Any]) -> str:
    """One line: documents, tokens, shards, tokenizer."""
    tok = manifest.get("tokenizer", {})
    return (
        f"{manifest.get('num_documents')} documents, {manifest.get('num_tokens')} tokens in "
        f"{len(manifest.get('shards', []))} shard(s) of {manifest.get('dtype')}, tokenizer {tok.get('name')!r} "
        f"(vocab {tok.get('vocab_size')}, sha256 {str(tok.get('sha256'))[:12]})"
    )
