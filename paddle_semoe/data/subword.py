"""Text tokenizers for prepared datasets: byte-level BPE, ``tokenizer.json``, SentencePiece.

Every tokenizer here is a :class:`TextTokenizer` with one canonical on-disk form, a directory::

    tokenizer/
        tokenizer.json | tokenizer.model     the model file (Hugging Face ``tokenizers`` JSON, or
                                             a SentencePiece model)
        tokenizer_meta.json                  kind, name, model file, its SHA-256, vocab size, EOS id

The SHA-256 of the model file is the tokenizer's identity (:attr:`TextTokenizer.sha256`): it is
recorded in dataset manifests, training checkpoints and inference packages, and a mismatch is
refused naming both tokenizers. The directory travels with the model (checkpoints and packages
carry a copy), so generation decodes with exactly the tokenizer the model was trained on.

Sources :func:`load_tokenizer` accepts (nothing is downloaded, ever):

- a ``tokenizer.json`` file (Hugging Face ``tokenizers``),
- a SentencePiece ``.model`` file,
- a directory written by :meth:`TextTokenizer.save` (verified against its SHA-256),
- a PaddleFormers / PaddleNLP (or Hugging Face) tokenizer directory: its ``tokenizer.json``, its
  SentencePiece model (``tokenizer.model``, ``spiece.model``, ``sentencepiece.bpe.model``, or the
  ``vocab_file`` named in ``tokenizer_config.json``), a byte-level BPE ``vocab.json`` +
  ``merges.txt`` pair, or a WordPiece ``vocab.txt``; the EOS token comes from
  ``tokenizer_config.json`` / ``special_tokens_map.json`` when they name one.

:func:`train_byte_level_bpe` trains a byte-level BPE on a stream of texts (the corpus is never
held in memory): ``decode(encode(text)) == text`` for every string.

The ``tokenizers`` and ``sentencepiece`` packages are imported when a tokenizer of that kind is
built, so the built-in byte corpora need neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from paddle_semoe.io.files import FileRecord, record_of, write_atomic

from .tokenizer import ByteTokenizer

__all__ = [
    "EOS_TOKEN",
    "META_FILE",
    "TokenizerError",
    "TextTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "ByteTextTokenizer",
    "train_byte_level_bpe",
    "copy_tokenizer_dir",
    "copy_tokenizer_files",
    "load_tokenizer",
    "load_tokenizer_dir",
    "model_tokenizer",
    "prompt_pad_id",
    "read_tokenizer_meta",
    "sha256_file",
]

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
"""The document separator special token of the BPE tokenizers trained here (id 0)."""
META_FILE = "tokenizer_meta.json"
_META_FORMAT = "paddle-semoe-tokenizer/1"
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
_SP_NAMES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "sentencepiece.model", "spm.model")


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded, is corrupt, or does not match what it is used with."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TextTokenizer:
    """Common interface: ``encode``/``encode_batch``/``decode`` plus identity and persistence.

    Attributes:
        kind: ``"hf"`` (``tokenizers`` JSON), ``"sentencepiece"`` or ``"byte"``.
        name: a human-readable name (e.g. ``"bpe-8192"`` or the source file's name).
        vocab_size: number of token ids (all ids are in ``[0, vocab_size)``).
        eos_id: id of the end-of-document token, or ``None`` when the tokenizer has none.
        sha256: SHA-256 of the model file (the tokenizer's identity).
    """

    kind: str = ""
    model_file: str = ""

    def __init__(self, name: str, vocab_size: int, eos_id: Optional[int], sha256: str) -> None:
        self.name = name
        self.vocab_size = int(vocab_size)
        self.eos_id = None if eos_id is None else int(eos_id)
        self.sha256 = sha256

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:  # pragma: no cover - abstract
        """Token ids of each text; implementations use every core."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:  # pragma: no cover - abstract
        """Text of ``ids`` (special tokens are dropped)."""
        raise NotImplementedError

    def _write_model(self, path: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def record(self) -> Dict[str, Any]:
        """JSON-serialisable identity: kind, name, sha256, vocab size, EOS id, model file."""
        return {
            "format": _META_FORMAT,
            "kind": self.kind,
            "name": self.name,
            "file": self.model_file,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
        }

    def save(self, directory: Path) -> List[Path]:
        """Write the canonical tokenizer directory; returns the files written (model, meta)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model = directory / self.model_file
        self._write_model(model)
        digest = sha256_file(model)
        if digest != self.sha256:
            raise TokenizerError(f"tokenizer {self.name!r}: saved model file {model} has SHA-256 {digest}, expected {self.sha256}")
        meta = directory / META_FILE
        meta.write_text(json.dumps(self.record(), indent=2, sort_keys=True) + "\n")
        return [model, meta]

    def describe(self) -> str:
        """``'name' (kind, vocab V, sha256 abcdef123456)`` for messages."""
        return f"{self.name!r} ({self.kind}, vocab {self.vocab_size}, sha256 {self.sha256[:12]})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


# ------------------------------------------------------------------------------ tokenizers JSON
def _hf():
    try:
        import tokenizers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise TokenizerError("the 'tokenizers' package is needed for BPE/tokenizer.json tokenizers: pip install tokenizers") from err
    return tokenizers


def _hf_eos(tok, preferred: Optional[str]) -> Optional[int]:
    for token in ((preferred,) if preferred else ()) + _EOS_CANDIDATES:
        tid = tok.token_to_id(token)
        if tid is not None:
            return int(tid)
    return None


class HFTokenizer(TextTokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (from a ``tokenizer.json``).

    ``encode_batch`` runs on every core (Rayon threads inside ``tokenizers``).
    """

    kind = "hf"
    model_file = "tokenizer.json"

    def __init__(self, tok, name: str, eos_token: Optional[str] = None) -> None:
        self._tok = tok
        self._json = tok.to_str().encode("utf-8")
        super().__init__(
            name, tok.get_vocab_size(with_added_tokens=True), _hf_eos(tok, eos_token), hashlib.sha256(self._json).hexdigest()
        )

    @classmethod
    def from_file(cls, path: Path, name: Optional[str] = None, eos_token: Optional[str] = None) -> "HFTokenizer":
        path = Path(path)
        try:
            tok = _hf().Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception types
            raise TokenizerError(f"cannot read tokenizer file {path}: {str(err).splitlines()[0] if str(err) else err}") from None
        return cls(tok, name or path.parent.name or path.name, eos_token)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [enc.ids for enc in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def _write_model(self, path: Path) -> None:
        path.write_bytes(self._json)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, name: Optional[str] = None, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, no prefix space) on a text stream.

    Args:
        texts: an iterable of strings, consumed once (stream it: the corpus is never held).
        vocab_size: final vocabulary size including the 256 byte symbols and the
            :data:`EOS_TOKEN` special token (id 0); at least 258.
        name: the tokenizer's name (default ``"bpe-<vocab_size>"``).
        min_frequency: a pair is merged only if it occurs at least this often.

    Returns:
        An :class:`HFTokenizer` whose ``decode(encode(t)) == t`` for every string ``t``. Its
        vocabulary can come out smaller than ``vocab_size`` on a small corpus.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
        raise TokenizerError(f"BPE vocab_size must be an int >= 258 (256 bytes + EOS + 1 merge), got {vocab_size!r}")
    hf = _hf()
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = HFTokenizer(tok, name or f"bpe-{vocab_size}", EOS_TOKEN)
    logger.info("trained byte-level BPE %s", out.describe())
    return out


# ------------------------------------------------------------------------------ SentencePiece
class SentencePieceTokenizer(TextTokenizer):
    """A SentencePiece model (``.model`` file); ``encode_batch`` uses every core."""

    kind = "sentencepiece"
    model_file = "tokenizer.model"

    def __init__(self, proto: bytes, name: str) -> None:
        try:
            import sentencepiece as spm
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise TokenizerError("the 'sentencepiece' package is needed for SentencePiece models: pip install sentencepiece") from err
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except Exception as err:
            raise TokenizerError(f"SentencePiece model {name!r} cannot be read: {err}") from None
        self._proto = proto
        eos = self._sp.eos_id()
        super().__init__(name, self._sp.get_piece_size(), eos if eos >= 0 else None, hashlib.sha256(proto).hexdigest())
        self._threads = max(os.cpu_count() or 1, 1)

    @classmethod
    def from_file(cls, path: Path, name: Optional[str] = None) -> "SentencePieceTokenizer":
        path = Path(path)
        return cls(path.read_bytes(), name or path.name)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self._threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def _write_model(self, path: Path) -> None:
        path.write_bytes(self._proto)


# ------------------------------------------------------------------------------ bytes
class ByteTextTokenizer(TextTokenizer):
    """The built-in byte tokenizer (ids = UTF-8 bytes) behind the :class:`TextTokenizer` API.

    Used for the built-in corpora and for checkpoints that carry no tokenizer; it has no model
    file, so :meth:`save` is not supported and its identity is the fixed string ``"byte"``.
    """

    kind = "byte"
    model_file = ""

    def __init__(self) -> None:
        self._byte = ByteTokenizer()
        super().__init__("byte", self._byte.vocab_size, None, hashlib.sha256(b"paddle-semoe byte tokenizer, ids 0-255").hexdigest())

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self._byte.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._byte.decode(ids)

    def save(self, directory: Path) -> List[Path]:
        raise TokenizerError("the byte tokenizer has no model file to save")


# ------------------------------------------------------------------------------ loading
def read_tokenizer_meta(directory: Path) -> Dict[str, Any]:
    """The ``tokenizer_meta.json`` of a canonical tokenizer directory (not verified)."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise TokenizerError(f"{directory} has no {META_FILE}: not a saved paddle-semoe tokenizer") from None
    except json.JSONDecodeError as err:
        raise TokenizerError(f"tokenizer metadata {path} is corrupt: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
        raise TokenizerError(f"tokenizer metadata {path} has format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {_META_FORMAT!r}")
    return meta


def load_tokenizer_dir(directory: Path, expect_sha256: Optional[str] = None) -> TextTokenizer:
    """Load a directory written by :meth:`TextTokenizer.save`, verifying the model's SHA-256.

    Raises:
        TokenizerError: missing/corrupt files, or a SHA-256 that differs from the metadata or
            from ``expect_sha256`` (the message names the file).
    """
    directory = Path(directory)
    meta = read_tokenizer_meta(directory)
    model = directory / str(meta.get("file", ""))
    if not model.is_file():
        raise TokenizerError(f"tokenizer model file missing: {model}")
    digest = sha256_file(model)
    for want, what in ((meta.get("sha256"), META_FILE), (expect_sha256, "the manifest")):
        if want is not None and digest != want:
            raise TokenizerError(f"tokenizer file {model} is corrupt or altered: SHA-256 {digest[:12]}... != {what} {str(want)[:12]}...")
    kind, name = meta.get("kind"), str(meta.get("name", model.name))
    if kind == "hf":
        tok: TextTokenizer = HFTokenizer.from_file(model, name)
        if meta.get("eos_id") is not None:
            tok.eos_id = int(meta["eos_id"])
    elif kind == "sentencepiece":
        tok = SentencePieceTokenizer.from_file(model, name)
    else:
        raise TokenizerError(f"tokenizer {directory}: unknown kind {kind!r} in {META_FILE}")
    if tok.sha256 != digest:  # an HF file that is not in canonical to_str() form
        raise TokenizerError(f"tokenizer file {model} is not in canonical form (re-save it with prepare_data.py)")
    return tok


def _special_token(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _dir_eos_token(directory: Path) -> Optional[str]:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise TokenizerError(f"{path} is not valid JSON: {err}") from None
            token = _special_token(cfg.get("eos_token")) if isinstance(cfg, dict) else None
            if token:
                return token
    return None


def _from_vocab_merges(vocab: Path, merges: Path, name: str, eos: Optional[str]) -> HFTokenizer:
    hf = _hf()
    try:
        model = hf.models.BPE.from_file(str(vocab), str(merges))
    except Exception as err:
        raise TokenizerError(f"cannot read BPE vocab/merges {vocab} + {merges}: {err}") from None
    tok = hf.Tokenizer(model)
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = hf.decoders.ByteLevel()
    return HFTokenizer(tok, name, eos)


def _from_wordpiece(vocab: Path, name: str, eos: Optional[str], lowercase: bool) -> HFTokenizer:
    hf = _hf()
    try:
        model = hf.models.WordPiece.from_file(str(vocab), unk_token="[UNK]")
    except Exception as err:
        raise TokenizerError(f"cannot read WordPiece vocab {vocab}: {err}") from None
    tok = hf.Tokenizer(model)
    tok.normalizer = hf.normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = hf.pre_tokenizers.BertPreTokenizer()
    tok.decoder = hf.decoders.WordPiece()
    return HFTokenizer(tok, name, eos or "[SEP]")


def _from_pretrained_dir(directory: Path) -> TextTokenizer:
    """A PaddleFormers / PaddleNLP / Hugging Face tokenizer directory, read from its files."""
    name = directory.name
    eos = _dir_eos_token(directory)
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer.from_file(directory / "tokenizer.json", name, eos)
    config: Dict[str, Any] = {}
    if (directory / "tokenizer_config.json").is_file():
        config = json.loads((directory / "tokenizer_config.json").read_text())
    vocab_file = config.get("vocab_file") if isinstance(config.get("vocab_file"), str) else None
    for candidate in ([vocab_file] if vocab_file and vocab_file.endswith(".model") else []) + list(_SP_NAMES):
        if (directory / candidate).is_file():
            return SentencePieceTokenizer.from_file(directory / candidate, name)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return _from_vocab_merges(directory / "vocab.json", directory / "merges.txt", name, eos)
    if (directory / "vocab.txt").is_file():
        return _from_wordpiece(directory / "vocab.txt", name, eos, bool(config.get("do_lower_case", True)))
    raise TokenizerError(
        f"tokenizer directory {directory} holds none of: tokenizer.json, a SentencePiece model "
        f"({', '.join(_SP_NAMES)}), vocab.json + merges.txt, vocab.txt"
    )


def load_tokenizer(source: Path) -> TextTokenizer:
    """Load a tokenizer from a file or directory (see the module docs for what is accepted).

    Raises:
        TokenizerError: the path does not exist or holds no readable tokenizer (one line, naming it).
    """
    path = Path(source)
    if not path.exists():
        raise TokenizerError(f"tokenizer not found: {path}")
    if path.is_dir():
        if (path / META_FILE).is_file():
            return load_tokenizer_dir(path)
        return _from_pretrained_dir(path)
    if path.suffix == ".json":
        return HFTokenizer.from_file(path, path.stem if path.name != "tokenizer.json" else (path.parent.name or path.stem))
    if path.suffix == ".model":
        return SentencePieceTokenizer.from_file(path, path.stem)
    raise TokenizerError(f"unrecognised tokenizer file {path}: expected a tokenizer.json, a SentencePiece .model, or a directory")


def copy_tokenizer_dir(src: Path, dst: Path) -> List[Tuple[str, Path]]:
    """Copy a canonical tokenizer directory (model + meta); returns ``(file name, dest path)``."""
    meta = read_tokenizer_meta(src)
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for name in (str(meta["file"]), META_FILE):
        shutil.copyfile(src / name, dst / name)
        out.append((name, dst / name))
    return out


def model_tokenizer(root: Optional[Path], model_vocab_size: int, override: Optional[Path] = None) -> TextTokenizer:
    """The tokenizer to encode prompts / decode outputs of a model.

    Order: ``override`` (any source :func:`load_tokenizer` accepts), else the ``tokenizer/``
    directory a checkpoint or inference package carries under ``root`` (verified against its
    SHA-256), else the byte tokenizer (models trained on the built-in corpora).

    Raises:
        TokenizerError: an unreadable/corrupt tokenizer, or one whose vocabulary exceeds the
            model's ``vocab_size``.
    """
    if override is not None:
        tok = load_tokenizer(override)
    elif root is not None and (Path(root) / "tokenizer" / META_FILE).is_file():
        tok = load_tokenizer_dir(Path(root) / "tokenizer")
    else:
        tok = ByteTextTokenizer()
    if tok.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"tokenizer {tok.describe()} has more tokens than the model's vocab_size={model_vocab_size}"
        )
    return tok


def encode_text_files(tok: TextTokenizer, paths: Sequence[Path]) -> Tuple[np.ndarray, int]:
    """Encode UTF-8 text files for evaluation: each file is one document, followed by EOS when the
    tokenizer has one.

    Returns:
        ``(ids, n_bytes)``: ``int64[N]`` token ids of all files in order, and their UTF-8 size.

    Raises:
        TokenizerError: a missing or empty file, or undecodable UTF-8 (file and byte offset named).
    """
    ids: List[int] = []
    n_bytes = 0
    for path in map(Path, paths):
        if not path.is_file():
            raise TokenizerError(f"{path}: no such text file")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise TokenizerError(f"{path}: undecodable UTF-8 at byte offset {err.start} ({err.reason})") from None
        if not text.strip():
            raise TokenizerError(f"{path}: the file holds no text")
        ids += tok.encode(text) + ([] if tok.eos_id is None else [tok.eos_id])
        n_bytes += len(data)
    return np.asarray(ids, dtype=np.int64), n_bytes


def prompt_pad_id(tok: TextTokenizer) -> int:
    """The id to left-pad a batch of prompts with: EOS (a document boundary) if any, else a space."""
    if tok.eos_id is not None:
        return tok.eos_id
    return tok.encode(" ")[-1]


def copy_tokenizer_files(root: Path, files: Sequence[Tuple[str, Path]]) -> List[FileRecord]:
    """Copy ``(relative name, source)`` files (a tokenizer's) under ``root`` durably (atomic write,
    fsync) and return their records for a checkpoint or package manifest."""
    records = []
    for name, src in files:
        dest = Path(root) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, Path(src).read_bytes())
        records.append(record_of(dest, name))
    return records
