"""Turn text files into a prepared token dataset (the library behind ``tools/prepare_data.py``).

Pipeline (everything streams; the corpus is never held in memory):

1. :func:`expand_inputs`: files, directories (recursive, hidden entries skipped) and globs into
   a sorted, de-duplicated file list.
2. :func:`iter_pieces`: each file read in 4 MiB chunks, UTF-8 decoded incrementally (an
   undecodable byte raises :class:`InputError` naming the file and byte offset, unless
   ``errors="replace"``), cut into documents (a whole file, blank-line separated paragraphs,
   single lines, or one JSON-lines field per line) and into pieces of at most ~1 MiB at line
   boundaries, while hashing the file (SHA-256).
3. Optionally a first pass trains a byte-level BPE on the pieces
   (:func:`~paddle_semoe.data.subword.train_byte_level_bpe`).
4. Pieces are encoded in batches with the tokenizer's ``encode_batch`` (every core) on a
   background thread while the next batch is read; tokens (plus an EOS per document when the
   tokenizer has one) go to fixed-size shards, document boundaries to the index.
5. The dataset is written into a temporary sibling directory, fsync'd, and renamed into place
   (an existing dataset is swapped atomically with ``overwrite=True``; a directory holding a
   different dataset is refused without it).

The format is described in :mod:`paddle_semoe.data.dataset`.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .corpus import corpus_names, load_documents
from .dataset import FORMAT, MANIFEST, OFFSETS_FILE, SOURCES_FILE, TOKENIZER_DIR, shard_name, token_dtype_for
from .subword import META_FILE, TextTokenizer, train_byte_level_bpe

__all__ = [
    "BuiltinSource",
    "InputError",
    "PrepareOptions",
    "Piece",
    "ProgressBar",
    "expand_inputs",
    "iter_pieces",
    "prepare_dataset",
    "DOC_BOUNDARIES",
    "INPUT_FORMATS",
]

logger = logging.getLogger(__name__)

DOC_BOUNDARIES = ("file", "blank_line", "line")
INPUT_FORMATS = ("auto", "text", "jsonl")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_READ_CHUNK = 1 << 22
_PIECE_CHARS = 1 << 20


class InputError(ValueError):
    """Bad input (empty file, undecodable bytes, malformed JSON line, ...); one line, naming it."""


@dataclass(frozen=True)
class PrepareOptions:
    """What to read and how (recorded in the manifest).

    Attributes:
        input_format: ``"auto"`` (``.jsonl``/``.ndjson`` are JSON lines, the rest text), ``"text"``
            or ``"jsonl"``.
        field: the JSON-lines field holding the text (dotted for nested objects, ``"a.b"``).
        doc_boundary: for text files: one document per ``"file"``, per ``"blank_line"``-separated
            paragraph, or per ``"line"``.
        errors: ``"strict"`` (undecodable bytes are an error) or ``"replace"`` (U+FFFD).
        skip_empty: skip empty files instead of refusing them.
        append_eos: end every document with the tokenizer's EOS token (when it has one).
        shard_bytes: target size of one token shard file.
    """

    input_format: str = "auto"
    field: str = "text"
    doc_boundary: str = "file"
    errors: str = "strict"
    skip_empty: bool = False
    append_eos: bool = True
    shard_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {self.input_format!r}")
        if self.doc_boundary not in DOC_BOUNDARIES:
            raise ValueError(f"doc_boundary must be one of {DOC_BOUNDARIES}, got {self.doc_boundary!r}")
        if self.errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {self.errors!r}")
        if not self.field or any(not part for part in self.field.split(".")):
            raise ValueError(f"field must be a (dotted) JSON key, got {self.field!r}")
        if self.shard_bytes < 4096:
            raise ValueError(f"shard_bytes must be >= 4096, got {self.shard_bytes}")


@dataclass
class Piece:
    """A piece of a document's text; ``last`` marks the end of the document."""

    text: str
    last: bool
    source: int  # index of the source file


@dataclass(frozen=True)
class BuiltinSource:
    """A built-in corpus (``builtin:NAME`` on the command line), one document per entry."""

    name: str

    @property
    def label(self) -> str:
        return f"builtin:{self.name}"

    def texts(self) -> List[str]:
        return _builtin_texts(self.name)

    @property
    def size(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.texts())


@functools.lru_cache(maxsize=4)
def _builtin_texts(name: str) -> List[str]:
    return [d.text for d in load_documents(name)]


Source = Union[Path, BuiltinSource]


def _source_size(src: Source) -> int:
    return src.size if isinstance(src, BuiltinSource) else src.stat().st_size


def _source_label(src: Source, resolve: bool = False) -> str:
    if isinstance(src, BuiltinSource):
        return src.label
    return str(src.resolve() if resolve else src)


@dataclass
class SourceStats:
    path: str
    bytes: int = 0
    sha256: str = ""
    documents: int = 0
    tokens: int = 0
    empty_documents_skipped: int = 0


# ------------------------------------------------------------------------------------ inputs
def _walk(directory: Path) -> List[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
    return found


def expand_inputs(specs: Sequence[str]) -> List[Source]:
    """Files, directories (recursive), glob patterns and ``builtin:NAME`` corpora into a list of
    distinct sources (each directory and pattern sorted).

    Raises:
        InputError: a spec that names nothing (no such file, or a glob/directory with no files).
    """
    if not specs:
        raise InputError("no inputs given")
    out: List[Source] = []
    seen: set = set()
    for spec in specs:
        path = Path(spec)
        if spec.startswith("builtin:"):
            name = spec[len("builtin:") :]
            if name not in corpus_names():
                raise InputError(f"unknown built-in corpus {spec!r}; valid: {', '.join('builtin:' + n for n in corpus_names())}")
            if spec not in seen:
                seen.add(spec)
                out.append(BuiltinSource(name))
            continue
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = _walk(path)
            if not matches:
                raise InputError(f"input directory {spec} holds no files")
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise InputError(f"input pattern {spec!r} matches no files")
        else:
            raise InputError(f"input not found: {spec}")
        for m in matches:
            key = m.resolve()
            if key not in seen:
                seen.add(key)
                out.append(m)
    return out


def _is_jsonl(path: Path, opts: PrepareOptions) -> bool:
    if opts.input_format == "auto":
        return path.suffix.lower() in _JSONL_SUFFIXES
    return opts.input_format == "jsonl"


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of ``data`` without a trailing, incomplete (so far) UTF-8 sequence."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n - back if back < need else n
    return n


def _decode_error(path: Path, offset: int, err: UnicodeDecodeError) -> InputError:
    return InputError(
        f"{path}: undecodable UTF-8 at byte offset {offset} ({err.reason}); fix the file or pass --errors replace"
    )


def _text_chunks(path: Path, errors: str, hasher: "hashlib._Hash", on_bytes: Callable[[int], None]) -> Iterator[str]:
    """Decoded text of a file in chunks, hashing the bytes as they are read."""
    base = 0
    carry = b""
    with open(path, "rb") as fh:
        while True:
            raw = fh.read(_READ_CHUNK)
            hasher.update(raw)
            on_bytes(len(raw))
            data = carry + raw
            cut = len(data) if not raw else _complete_utf8_prefix(data)
            try:
                text = data[:cut].decode("utf-8", errors=errors)
            except UnicodeDecodeError as err:
                raise _decode_error(path, base + err.start, err) from None
            if text:
                yield text
            base += cut
            carry = data[cut:]
            if not raw:
                return


def _lines(chunks: Iterator[str]) -> Iterator[str]:
    """Lines (with their ``\\n``, the last one possibly without) of a chunked text."""
    rest = ""
    for chunk in chunks:
        parts = (rest + chunk).split("\n")
        rest = parts.pop()
        for line in parts:
            yield line + "\n"
    if rest:
        yield rest


def _file_pieces(chunks: Iterator[str]) -> Iterator[str]:
    """Pieces of at most ~``_PIECE_CHARS`` cut after a newline when there is one."""
    buf = ""
    for chunk in chunks:
        buf += chunk
        while len(buf) >= _PIECE_CHARS:
            cut = buf.rfind("\n", 0, _PIECE_CHARS) + 1 or _PIECE_CHARS
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _text_documents(path: Path, src: int, opts: PrepareOptions, stats: SourceStats, chunks: Iterator[str]) -> Iterator[Piece]:
    if opts.doc_boundary == "file":
        previous: Optional[str] = None
        for piece in _file_pieces(chunks):
            if previous is not None:
                yield Piece(previous, False, src)
            previous = piece
        if previous is not None:
            stats.documents += 1
            yield Piece(previous, True, src)
        return
    if opts.doc_boundary == "line":
        for line in _lines(chunks):
            text = line.rstrip("\r\n")
            if text.strip():
                stats.documents += 1
                yield Piece(text, True, src)
        return
    # blank_line: paragraphs separated by one or more blank lines
    para: List[str] = []
    size = 0
    in_doc = False  # a paragraph is open (some of it may already be yielded as a piece)
    for line in _lines(chunks):
        if not line.strip():
            if in_doc:
                stats.documents += 1
                yield Piece("".join(para), True, src)
                para, size, in_doc = [], 0, False
            continue
        para.append(line)
        size += len(line)
        in_doc = True
        if size >= _PIECE_CHARS:
            yield Piece("".join(para), False, src)
            para, size = [], 0
    if in_doc:
        stats.documents += 1
        yield Piece("".join(para), True, src)


def _json_field(obj: Any, dotted: str) -> Tuple[bool, Any]:
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return False, None
        obj = obj[key]
    return True, obj


def _jsonl_documents(
    path: Path, src: int, opts: PrepareOptions, stats: SourceStats, hasher: "hashlib._Hash", on_bytes: Callable[[int], None]
) -> Iterator[Piece]:
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            hasher.update(raw)
            on_bytes(len(raw))
            try:
                line = raw.decode("utf-8", errors=opts.errors)
            except UnicodeDecodeError as err:
                raise InputError(
                    f"{path}:{lineno}: undecodable UTF-8 at byte offset {offset + err.start} ({err.reason}); "
                    "fix the file or pass --errors replace"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: malformed JSON line ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            found, value = _json_field(obj, opts.field)
            if not found:
                keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
                raise InputError(f"{path}:{lineno}: no field {opts.field!r} (the object has: {keys}); choose one with --field")
            if not isinstance(value, str):
                raise InputError(f"{path}:{lineno}: field {opts.field!r} is a {type(value).__name__}, expected a string")
            if not value:
                stats.empty_documents_skipped += 1
                continue
            stats.documents += 1
            yield Piece(value, True, src)


def iter_pieces(
    files: Sequence[Source],
    opts: PrepareOptions,
    stats: Optional[List[SourceStats]] = None,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> Iterator[Piece]:
    """Document pieces of all ``files`` in order (see the module docs).

    Args:
        files: input files (:func:`expand_inputs`).
        opts: reading options.
        stats: if given, filled with one :class:`SourceStats` per file (size, SHA-256,
            document count) as the files are read.
        on_bytes: called with the number of bytes read, for progress.

    Raises:
        InputError: an empty file (unless ``opts.skip_empty``), undecodable bytes, a malformed
            JSON line or one without the field.
    """
    for src, path in enumerate(files):
        size = _source_size(path)
        st = SourceStats(_source_label(path), size)
        if stats is not None:
            stats.append(st)
        if isinstance(path, BuiltinSource):
            hasher = hashlib.sha256()
            for text in path.texts():
                raw = text.encode("utf-8")
                hasher.update(raw)
                on_bytes(len(raw))
                st.documents += 1
                yield Piece(text, True, src)
            st.sha256 = hasher.hexdigest()
            continue
        if size == 0:
            if opts.skip_empty:
                logger.warning("skipping empty file %s", path)
                st.sha256 = hashlib.sha256(b"").hexdigest()
                continue
            raise InputError(f"input file {path} is empty (0 bytes); remove it or pass --skip_empty")
        hasher = hashlib.sha256()
        if _is_jsonl(path, opts):
            yield from _jsonl_documents(path, src, opts, st, hasher, on_bytes)
        else:
            yield from _text_documents(path, src, opts, st, _text_chunks(path, opts.errors, hasher, on_bytes))
        st.sha256 = hasher.hexdigest()
        if st.documents == 0:
            if opts.skip_empty:
                logger.warning("no documents in %s (blank, or every text empty)", path)
            else:
                raise InputError(f"input file {path} holds no documents (only blank lines or empty texts); pass --skip_empty to go on")


# ------------------------------------------------------------------------------------ progress
class ProgressBar:
    """A one-line progress bar with rate and ETA on a stream (stderr by default).

    On a terminal the line is redrawn in place every ``interval_s``; otherwise a line is printed
    every ``10 * interval_s`` so logs stay short.
    """

    def __init__(self, label: str, total_bytes: int, stream: Optional[IO[str]] = None, interval_s: float = 0.5) -> None:
        self.label = label
        self.total = max(int(total_bytes), 1)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval_s if self.tty else 10 * interval_s
        self.start = time.monotonic()
        self.last = 0.0
        self.done = 0
        self.tokens = 0

    def update(self, nbytes: int = 0, tokens: int = 0) -> None:
        self.done += nbytes
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._draw(now)

    def _line(self, now: float) -> str:
        dt = max(now - self.start, 1e-9)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = "?" if eta == float("inf") else f"{int(eta) // 60}m{int(eta) % 60:02d}s"
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 24)
        tok = f" | {self.tokens / dt / 1e3:,.0f}k tok/s" if self.tokens else ""
        return (
            f"{self.label} [{bar:<24}] {100 * frac:5.1f}% {self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB "
            f"| {rate / 1e6:.2f} MB/s{tok} | ETA {eta_s}"
        )

    def _draw(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r" + self._line(now) + "\x1b[K")
        else:
            self.stream.write(self._line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        now = time.monotonic()
        self._draw(now)
        if self.tty:
            self.stream.write("\n")
        self.stream.write(f"{self.label}: done in {now - self.start:.1f} s\n")
        self.stream.flush()


# ------------------------------------------------------------------------------------ writing
class _ShardWriter:
    """Appends tokens to fixed-size shard files, hashing them as they are written."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.dir = directory
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: List[Dict[str, Any]] = []
        self._fh: Optional[IO[bytes]] = None
        self._hash = hashlib.sha256()
        self._count = 0

    def _open(self) -> None:
        self._fh = open(self.dir / shard_name(len(self.shards)), "wb")
        self._hash = hashlib.sha256()
        self._count = 0

    def _close_shard(self) -> None:
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        name = shard_name(len(self.shards))
        self.shards.append(
            {"name": name, "tokens": self._count, "bytes": self._count * self.dtype.itemsize, "sha256": self._hash.hexdigest()}
        )
        self._fh = None

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.astype(self.dtype, copy=False)
        while data.size:
            if self._fh is None:
                self._open()
            n = min(data.size, self.shard_tokens - self._count)
            raw = data[:n].tobytes()
            self._fh.write(raw)  # type: ignore[union-attr]
            self._hash.update(raw)
            self._count += n
            data = data[n:]
            if self._count == self.shard_tokens:
                self._close_shard()

    def close(self) -> List[Dict[str, Any]]:
        if self._fh is not None and self._count:
            self._close_shard()
        elif self._fh is not None:  # opened but empty: drop it
            self._fh.close()
            (self.dir / shard_name(len(self.shards))).unlink()
        return self.shards


class _ArrayFile:
    """An append-only raw little-endian array file, buffered, hashed."""

    def __init__(self, path: Path, dtype: str) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self._fh = open(path, "wb")
        self._buf: List[int] = []
        self._hash = hashlib.sha256()
        self.bytes = 0

    def append(self, value: int) -> None:
        self._buf.append(value)
        if len(self._buf) >= 1 << 16:
            self._flush()

    def _flush(self) -> None:
        raw = np.asarray(self._buf, dtype=self.dtype).tobytes()
        self._fh.write(raw)
        self._hash.update(raw)
        self.bytes += len(raw)
        self._buf = []

    def close(self) -> Dict[str, Any]:
        self._flush()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return {"name": self.path.name, "bytes": self.bytes, "sha256": self._hash.hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_entry(path: Path, name: str) -> Dict[str, Any]:
    h = hashlib.sha256(path.read_bytes())
    return {"name": name, "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange)
    return rc == 0


def _check_output(out: Path) -> Optional[Dict[str, Any]]:
    """Refuse an output that holds something else; return the existing manifest if it is a dataset."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory")
    if not any(out.iterdir()):
        return None
    mpath = out / MANIFEST
    try:
        manifest = json.loads(mpath.read_text()) if mpath.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(
            f"output directory {out} is not empty and holds no prepared dataset; refusing to write into it "
            "(choose another --output, or empty it yourself)"
        )
    return manifest


def _request(files: Sequence[Source], opts: PrepareOptions, tokenizer_spec: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "sources": [{"path": _source_label(p, resolve=True), "bytes": _source_size(p)} for p in files],
        "options": asdict(opts),
        "tokenizer": tokenizer_spec,
    }


def _describe_difference(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    diffs = [key for key in ("sources", "options", "tokenizer") if old.get(key) != new.get(key)]
    return ", ".join(diffs) or "content"


@dataclass
class PrepareResult:
    path: Path
    manifest: Dict[str, Any]
    unchanged: bool = False  # the output already held exactly this dataset
    stats: Dict[str, float] = field(default_factory=dict)


def _encode_batches(
    pieces: Iterator[Piece], tokenizer: TextTokenizer, batch_chars: int
) -> Iterator[Tuple[List[Piece], List[List[int]]]]:
    """Encode pieces in batches on a background thread while the next batch is read."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending: Optional[Tuple[List[Piece], Future]] = None
        batch: List[Piece] = []
        size = 0
        for piece in pieces:
            batch.append(piece)
            size += len(piece.text)
            if size >= batch_chars:
                job = (batch, pool.submit(tokenizer.encode_batch, [p.text for p in batch]))
                if pending is not None:
                    yield pending[0], pending[1].result()
                pending = job
                batch, size = [], 0
        if batch:
            job = (batch, pool.submit(tokenizer.encode_batch, [p.text for p in batch]))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = job
        if pending is not None:
            yield pending[0], pending[1].result()


def prepare_dataset(
    inputs: Sequence[str],
    output: Path,
    *,
    tokenizer: Optional[TextTokenizer] = None,
    bpe_vocab_size: Optional[int] = None,
    bpe_train_bytes: Optional[int] = 512 << 20,
    options: PrepareOptions = PrepareOptions(),
    overwrite: bool = False,
    progress: bool = True,
    batch_chars: int = 4 << 20,
) -> PrepareResult:
    """Prepare a dataset from ``inputs`` into ``output`` (see the module docs).

    Args:
        inputs: files, directories and glob patterns.
        output: the dataset directory to create (or replace with ``overwrite``).
        tokenizer: an existing tokenizer; or ``None`` with ``bpe_vocab_size`` to train a
            byte-level BPE on the inputs first.
        bpe_train_bytes: train the BPE on at most this many leading input bytes (None: all).
        options: reading options.
        overwrite: replace an existing, different dataset in ``output`` (atomically).
        progress: draw progress bars on stderr.
        batch_chars: characters per encode batch.

    Returns:
        A :class:`PrepareResult` (manifest as written; ``unchanged`` when the output already
        held exactly this dataset and was left alone).

    Raises:
        InputError: bad inputs or an output directory holding something else (see above).
        ValueError: neither/both of ``tokenizer`` and ``bpe_vocab_size``.
    """
    if (tokenizer is None) == (bpe_vocab_size is None):
        raise ValueError("give exactly one of tokenizer (an existing one) and bpe_vocab_size (train a BPE)")
    output = Path(output)
    files = expand_inputs(inputs)
    existing = _check_output(output)
    tok_spec: Dict[str, Any] = (
        {"train_bpe": bpe_vocab_size, "train_bytes": bpe_train_bytes} if tokenizer is None else {"sha256": tokenizer.sha256}
    )
    request = _request(files, options, tok_spec)
    if existing is not None and not overwrite and existing.get("request") != request:
        raise InputError(
            f"output directory {output} already holds a different dataset (different "
            f"{_describe_difference(existing.get('request', {}), request)}); pass --overwrite to replace it, or choose another --output"
        )
    total_bytes = sum(_source_size(p) for p in files)
    t0 = time.monotonic()

    if tokenizer is None:
        bar = ProgressBar("train BPE", min(total_bytes, bpe_train_bytes or total_bytes)) if progress else None
        budget = [bpe_train_bytes if bpe_train_bytes is not None else float("inf")]

        def on_train_bytes(n: int) -> None:
            budget[0] -= n
            if bar is not None:
                bar.update(n)

        def training_texts() -> Iterator[str]:
            for piece in iter_pieces(files, options, on_bytes=on_train_bytes):
                if piece.text:
                    yield piece.text
                if budget[0] <= 0:
                    return

        tokenizer = train_byte_level_bpe(training_texts(), int(bpe_vocab_size))  # type: ignore[arg-type]
        if bar is not None:
            bar.close()
    t_train = time.monotonic() - t0

    dtype = token_dtype_for(tokenizer.vocab_size)
    eos = tokenizer.eos_id if options.append_eos else None
    parent = output.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards = _ShardWriter(tmp, dtype, max(options.shard_bytes // dtype.itemsize, 1))
        offsets = _ArrayFile(tmp / OFFSETS_FILE, "<i8")
        doc_sources = _ArrayFile(tmp / SOURCES_FILE, "<i4")
        offsets.append(0)
        stats: List[SourceStats] = []
        bar = ProgressBar("tokenize", total_bytes) if progress else None
        read_bytes = [0]

        def on_bytes(n: int) -> None:
            read_bytes[0] += n

        position = 0
        max_id = -1
        shown = 0
        for batch, encoded in _encode_batches(iter_pieces(files, options, stats, on_bytes), tokenizer, batch_chars):
            n_tokens = 0
            for piece, ids in zip(batch, encoded):
                arr = np.asarray(ids, dtype=np.int64)
                if piece.last and eos is not None:
                    arr = np.append(arr, eos)
                if arr.size:
                    max_id = max(max_id, int(arr.max()))
                    shards.write(arr)
                position += arr.size
                n_tokens += arr.size
                stats[piece.source].tokens += arr.size
                if piece.last:
                    offsets.append(position)
                    doc_sources.append(piece.source)
            if bar is not None:
                bar.update(read_bytes[0] - shown, n_tokens)
                shown = read_bytes[0]
        if bar is not None:
            bar.update(read_bytes[0] - shown)
            bar.close()
        shard_entries = shards.close()
        offsets_entry, sources_entry = offsets.close(), doc_sources.close()
        num_docs = offsets_entry["bytes"] // 8 - 1
        if position == 0 or num_docs == 0:
            raise InputError("the inputs hold no text to tokenize (every document is empty)")
        if max_id >= tokenizer.vocab_size:
            raise InputError(f"tokenizer {tokenizer.name!r} produced id {max_id} >= its vocab_size {tokenizer.vocab_size}")
        tok_files = tokenizer.save(tmp / TOKENIZER_DIR)
        files_list = (
            [dict(s) for s in shard_entries]
            + [offsets_entry, sources_entry]
            + [_file_entry(p, f"{TOKENIZER_DIR}/{p.name}") for p in tok_files]
        )
        files_list = [{"name": f["name"], "bytes": f["bytes"], "sha256": f["sha256"]} for f in files_list]
        fingerprint = hashlib.sha256(
            json.dumps({"dtype": dtype.str, "files": files_list}, sort_keys=True).encode()
        ).hexdigest()
        manifest = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "dtype": dtype.str,
            "num_tokens": position,
            "num_documents": num_docs,
            "eos_id": eos,
            "tokenizer": tokenizer.record(),
            "sources": [asdict(s) for s in stats],
            "shards": shard_entries,
            "files": files_list,
            "request": request,
            "created_unix": int(time.time()),
        }
        if num_docs < 2:
            logger.warning("the dataset has a single document: training needs >= 2 to split off validation (try --doc_boundary)")
        skipped = sum(s.empty_documents_skipped for s in stats)
        if skipped:
            logger.warning("skipped %d empty documents", skipped)
        mtmp = tmp / (MANIFEST + ".part")
        with open(mtmp, "w") as fh:
            fh.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(mtmp, tmp / MANIFEST)
        _fsync_dir(tmp)
        elapsed = time.monotonic() - t0
        result_stats = {"seconds": elapsed, "train_seconds": t_train, "bytes": float(total_bytes), "tokens": float(position)}
        if existing is not None and existing.get("fingerprint") == fingerprint:
            logger.info("%s already holds this dataset (fingerprint %s): left unchanged", output, fingerprint[:12])
            return PrepareResult(output, existing, unchanged=True, stats=result_stats)
        if existing is not None and not overwrite:
            raise InputError(
                f"output directory {output} already holds a different dataset (the source contents changed); "
                "pass --overwrite to replace it"
            )
        if output.exists() and existing is None:
            output.rmdir()  # empty directory
        if output.exists():
            if not _exchange(tmp, output):
                old = parent / f".{output.name}.old-{os.getpid()}"
                os.replace(output, old)
                os.replace(tmp, output)
                tmp = old
        else:
            os.replace(tmp, output)
        _fsync_dir(parent)
        return PrepareResult(output, manifest, stats=result_stats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def manifest_tokenizer_files(dataset_dir: Path) -> List[Tuple[str, Path]]:
    """``(relative name, path)`` of the tokenizer files of a prepared dataset."""
    directory = Path(dataset_dir) / TOKENIZER_DIR
    meta = json.loads((directory / META_FILE).read_text())
    return [(f"{TOKENIZER_DIR}/{name}", directory / name) for name in (meta["file"], META_FILE)]
