"""Offline English text corpora built from the Python standard library, never downloaded.

Named corpora (see :func:`corpus_names`):

``pydoc_topics``
    The Python documentation's help topics (``pydoc_data.topics.topics``): one document per
    topic, in sorted topic order. About 0.47 MB of English prose on CPython 3.11.
``stdlib_docstrings``
    The docstrings of the pure-Python standard library, read from the source files with
    :mod:`ast` (nothing is imported or executed): one document per module, modules in sorted
    dotted-name order, docstrings in source order (module, then classes and functions depth
    first), cleaned with :func:`inspect.cleandoc`. Packages that distributions often ship
    separately (``tkinter``, ``idlelib``, ``lib2to3``, ``distutils``, ...), the boilerplate
    ``encodings`` package and test directories are left out. About 1.5 MB on CPython 3.11;
    building it parses ~550 files (~2-3 s).
``python_docs``
    ``pydoc_topics`` followed by ``stdlib_docstrings`` (about 2 MB).

Every document's text ends with exactly one blank line (``"\\n\\n"``); the corpus bytes are the
UTF-8 documents concatenated. The content depends only on the CPython version (topics and
docstrings change between patch releases), so the SHA-256 of the bytes is exposed for
recording beside checkpoints; :data:`KNOWN_SHA256` lists the values measured so far and a
mismatch is logged as a warning (the corpus still loads).

The train/validation split is by whole documents spread evenly through the corpus, holding
about the requested fraction of the bytes (:func:`split_documents`), so validation text is
never a cut-off tail of a training document and is not biased towards the alphabetically last
topics or modules.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .loader import TokenBatcher
from .subword import ByteTextTokenizer
from .tokenizer import unigram_cross_entropy_nats

__all__ = [
    "Document",
    "CorpusSplit",
    "KNOWN_SHA256",
    "corpus_names",
    "load_documents",
    "load_corpus",
    "corpus_sha256",
    "expected_sha256",
    "split_documents",
    "load_split",
    "stdlib_docstring_documents",
]

logger = logging.getLogger(__name__)

BYTE_TOKENIZER_IDENTITY: Mapping[str, Any] = MappingProxyType(
    {"name": "byte", "sha256": ByteTextTokenizer().sha256, "kind": "byte"}
)
"""What checkpoints trained on the built-in corpora record as their tokenizer."""

DOC_SEPARATOR = "\n\n"
"""Every document's text ends with this (trailing newlines are normalised to it)."""

# Top-level stdlib names left out of ``stdlib_docstrings``: split into separate distro packages
# (so absent on some machines), GUI/demo code, generated boilerplate, or jokes.
_EXCLUDED_TOP_LEVEL = frozenset(
    {
        "antigravity",
        "distutils",
        "encodings",
        "ensurepip",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "this",
        "tkinter",
        "turtle",
        "turtledemo",
        "venv",
    }
)
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})

KNOWN_SHA256: Mapping[Tuple[str, str], str] = MappingProxyType(
    {
        # (corpus name, CPython "major.minor.micro") -> SHA-256 of the corpus bytes.
        # CPython 3.11.7 (source build): 466,196 / 1,355,403 / 1,821,599 bytes.
        ("pydoc_topics", "3.11.7"): "7cfbd9e617689f5f3a3cb7ce72fb0ee7e9b7f90ad5fee87a07cee79bc0b87f02",
        ("stdlib_docstrings", "3.11.7"): "22103d73ecbd75140188eca1f0c1fc4beef27a7a5a3eca2b186a71c082e9b02f",
        ("python_docs", "3.11.7"): "e3ab971317dbcce4039fbce8a71bf047f6532ea89a565fc642e5b5267cf81aba",
    }
)
"""SHA-256 of each corpus as measured on a given CPython version. Distributions that patch
the standard library (e.g. Debian) can differ for ``stdlib_docstrings``; that is logged, not
fatal. Add a line when a new Python version is measured."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable name and its text (ending in ``DOC_SEPARATOR``)."""

    name: str
    text: str


@dataclass(frozen=True, eq=False)
class CorpusSplit:
    """A corpus split into train and validation byte arrays (read-only).

    Attributes:
        train: ``uint8[N_train]`` UTF-8 bytes of the training documents, concatenated.
        val: ``uint8[N_val]`` UTF-8 bytes of the validation documents, concatenated.
        sha256: hex SHA-256 of the whole corpus bytes (:func:`load_corpus`), before splitting.
        name: the corpus name.
        val_documents: names of the documents in ``val``, in order.
        num_documents: number of documents in the corpus.
    """

    train: np.ndarray
    val: np.ndarray
    sha256: str
    name: str
    val_documents: Tuple[str, ...]
    num_documents: int

    # The interface shared with :class:`~paddle_semoe.data.blend.DatasetsSplit` (the trainer's view).
    def unigram_baseline(self, vocab_size: int) -> float:
        """Held-out unigram cross-entropy (nats/token) of the validation bytes."""
        return unigram_cross_entropy_nats(self.train, self.val, vocab_size)

    def batcher(self, global_batch_size: int, seq_len: int, *, seed: int, rank: int, world_size: int) -> TokenBatcher:
        """The training batcher over ``train`` (see :class:`~paddle_semoe.data.loader.TokenBatcher`)."""
        return TokenBatcher(self.train, global_batch_size, seq_len, seed=seed, rank=rank, world_size=world_size)

    def tokenizer_identity(self) -> Dict[str, Any]:
        """The byte tokenizer's identity (name, sha256, kind), recorded in checkpoints."""
        return dict(BYTE_TOKENIZER_IDENTITY)

    def tokenizer_files(self) -> List[Tuple[str, Path]]:
        """The byte tokenizer has no files to carry."""
        return []


def _normalise(text: str) -> str:
    return text.rstrip("\n") + DOC_SEPARATOR


def _pydoc_topics() -> List[Document]:
    from pydoc_data.topics import topics  # stdlib; imported lazily (~0.5 MB of strings)

    return [Document(f"topic:{key}", _normalise(topics[key])) for key in sorted(topics)]


def _docstrings_in_source_order(tree: ast.AST) -> Iterator[str]:
    """Docstrings of a module, then of its classes/functions depth first in source order."""
    if isinstance(tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(tree, clean=True)
        if doc and doc.strip():
            yield doc.strip()
    for child in ast.iter_child_nodes(tree):
        yield from _docstrings_in_source_order(child)


def _stdlib_sources(stdlib_dir: Path, top_level: Iterable[str]) -> Iterator[Tuple[str, Path]]:
    """``(dotted module name, source path)`` for the given top-level names, sorted, recursive."""
    for name in sorted(top_level):
        single = stdlib_dir / f"{name}.py"
        package = stdlib_dir / name
        if single.is_file():
            yield name, single
        elif (package / "__init__.py").is_file():
            found = []
            for root, dirs, files in os.walk(package):
                dirs[:] = sorted(d for d in dirs if d not in _EXCLUDED_DIRS)
                rel = Path(root).relative_to(stdlib_dir)
                for file in files:
                    if file.endswith(".py"):
                        parts = list(rel.parts) + ([] if file == "__init__.py" else [file[:-3]])
                        found.append((".".join(parts), Path(root) / file))
            yield from sorted(found)
        # else: a built-in or extension module without Python source


def stdlib_docstring_documents(
    top_level: Optional[Iterable[str]] = None, stdlib_dir: Optional[Path] = None
) -> List[Document]:
    """Build ``stdlib_docstrings`` documents (public for tests and custom corpora).

    Args:
        top_level: top-level module/package names; default: ``sys.stdlib_module_names`` minus
            the excluded set.
        stdlib_dir: where the stdlib sources live; default: the directory of :mod:`os`.
    """
    if stdlib_dir is None:
        stdlib_dir = Path(os.__file__).resolve().parent
    if top_level is None:
        top_level = sorted(set(sys.stdlib_module_names) - _EXCLUDED_TOP_LEVEL)
    documents: List[Document] = []
    for module, path in _stdlib_sources(stdlib_dir, top_level):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError) as err:
            logger.warning("corpus: skipping %s (%s): %s", module, path, err)
            continue
        docs = list(_docstrings_in_source_order(tree))
        if docs:
            documents.append(Document(f"module:{module}", _normalise(DOC_SEPARATOR.join(docs))))
    if not documents:
        raise RuntimeError(f"no standard-library sources with docstrings found under {stdlib_dir}")
    return documents


def _python_docs() -> List[Document]:
    return _pydoc_topics() + stdlib_docstring_documents()


_CORPORA: Mapping[str, Callable[[], List[Document]]] = MappingProxyType(
    {
        "pydoc_topics": _pydoc_topics,
        "stdlib_docstrings": stdlib_docstring_documents,
        "python_docs": _python_docs,
    }
)


def corpus_names() -> Tuple[str, ...]:
    """The names accepted by :func:`load_corpus`, sorted."""
    return tuple(sorted(_CORPORA))


def load_documents(name: str = "pydoc_topics") -> List[Document]:
    """The documents of corpus ``name``, in their fixed order.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names).
    """
    try:
        builder = _CORPORA[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown corpus {name!r}; valid names: {', '.join(corpus_names())}") from None
    return builder()


def _encode(documents: Sequence[Document]) -> bytes:
    return b"".join(doc.text.encode("utf-8") for doc in documents)


def load_corpus(name: str = "pydoc_topics") -> bytes:
    """The corpus as UTF-8 bytes: its documents concatenated (see the module docs)."""
    return _encode(load_documents(name))


def corpus_sha256(data: bytes) -> str:
    """Hex SHA-256 of corpus bytes."""
    return hashlib.sha256(data).hexdigest()


def expected_sha256(name: str, python_version: Optional[str] = None) -> Optional[str]:
    """The recorded SHA-256 of corpus ``name`` for a CPython version (default: this one), if known."""
    if python_version is None:
        python_version = "%d.%d.%d" % sys.version_info[:3]
    return KNOWN_SHA256.get((name, python_version))


def split_documents(
    documents: Sequence[Document], val_fraction: float = 0.05
) -> Tuple[List[Document], List[Document]]:
    """Split documents into ``(train, val)``, both in corpus order, by whole documents.

    Documents are visited in order; a document goes to validation exactly when the validation
    share of the bytes *before* it is below ``val_fraction`` (exact integer arithmetic). The
    choice never looks at the document's own size, so validation documents are a size-unbiased,
    evenly spread sample, and they hold ``val_fraction`` of the bytes up to about one document
    (e.g. 8.8% for ``pydoc_topics`` at 0.05, whose topics vary from 0.1 to 30 KB; 5.3% for
    ``stdlib_docstrings``). At least one document lands on each side.

    Raises:
        ValueError: ``val_fraction`` not in ``(0, 1)``, or fewer than two documents.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(documents) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(documents)}")
    frac = Fraction(val_fraction).limit_denominator(1_000_000)
    num, den = frac.numerator, frac.denominator
    sizes = [len(doc.text.encode("utf-8")) for doc in documents]
    is_val: List[bool] = []
    seen = val_bytes = 0
    for size in sizes:
        take = den * val_bytes < num * seen  # validation share so far below the target
        is_val.append(take)
        val_bytes += size if take else 0
        seen += size
    if not any(is_val):
        is_val[-1] = True
    if all(is_val):
        is_val[0] = False
    train = [doc for doc, v in zip(documents, is_val) if not v]
    val = [doc for doc, v in zip(documents, is_val) if v]
    return train, val


def _as_array(data: bytes) -> np.ndarray:
    """``uint8[len(data)]``, a read-only view of the (immutable) bytes."""
    return np.frombuffer(data, dtype=np.uint8)


def load_split(name: str = "pydoc_topics", val_fraction: float = 0.05) -> CorpusSplit:
    """Load corpus ``name`` and split it into train/validation bytes by document.

    Returns:
        A :class:`CorpusSplit`; ``train``/``val`` are read-only ``uint8`` arrays whose values
        are also the :class:`~paddle_semoe.data.tokenizer.ByteTokenizer` token ids.

    Raises:
        ValueError: unknown corpus name or bad ``val_fraction``.
    """
    documents = load_documents(name)
    sha = corpus_sha256(_encode(documents))
    expected = expected_sha256(name)
    if expected is not None and expected != sha:
        logger.warning("corpus %r: sha256 %s differs from the value recorded for this Python (%s)", name, sha, expected)
    train, val = split_documents(documents, val_fraction)
    split = CorpusSplit(
        train=_as_array(_encode(train)),
        val=_as_array(_encode(val)),
        sha256=sha,
        name=name,
        val_documents=tuple(doc.name for doc in val),
        num_documents=len(documents),
    )
    logger.info(
        "corpus %r: %d documents, %d train bytes, %d val bytes (%d documents), sha256 %s",
        name, len(documents), split.train.size, split.val.size, len(val), sha,
    )
    return split
