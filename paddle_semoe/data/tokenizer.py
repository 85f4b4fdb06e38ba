"""Byte-level tokenizer: token id = UTF-8 byte value, plus optional special tokens.

With no special tokens the vocabulary is exactly the 256 byte values, so the ``uint8`` corpus
arrays from :mod:`paddle_semoe.data.corpus` are already token ids. Special tokens (any of
``"bos"``, ``"eos"``, ``"pad"``) take ids 256, 257, ... in the order given.

:func:`unigram_entropy_nats` gives the loss of the best context-free (unigram) model of a
token stream: a language model's validation cross-entropy must fall below it to show it has
learned anything beyond byte frequencies.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "BYTE_VOCAB_SIZE",
    "SPECIAL_TOKENS",
    "ByteTokenizer",
    "unigram_entropy_nats",
    "unigram_cross_entropy_nats",
]

logger = logging.getLogger(__name__)

BYTE_VOCAB_SIZE = 256
SPECIAL_TOKENS: Tuple[str, ...] = ("bos", "eos", "pad")
"""The special token names a :class:`ByteTokenizer` accepts."""

TokenArray = Union[np.ndarray, Sequence[int]]


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255) with optional special tokens (ids 256+).

    Args:
        special_tokens: names from :data:`SPECIAL_TOKENS`, e.g. ``("bos", "eos", "pad")``;
            they get ids ``256, 257, ...`` in this order.

    Example::

        tok = ByteTokenizer(("bos", "eos"))
        ids = tok.encode("héllo", add_bos=True)   # [256, 104, 195, 169, 108, 108, 111]
        tok.decode(ids)                           # "héllo" (special tokens skipped)
    """

    def __init__(self, special_tokens: Sequence[str] = ()) -> None:
        specials = tuple(special_tokens)
        unknown = [name for name in specials if name not in SPECIAL_TOKENS]
        if unknown:
            raise ValueError(f"unknown special token(s) {unknown}; valid: {', '.join(SPECIAL_TOKENS)}")
        if len(set(specials)) != len(specials):
            raise ValueError(f"duplicate special tokens in {specials}")
        self._special_ids: Dict[str, int] = {name: BYTE_VOCAB_SIZE + i for i, name in enumerate(specials)}
        self._special_names: Dict[int, str] = {i: name for name, i in self._special_ids.items()}

    @property
    def vocab_size(self) -> int:
        """256 plus the number of special tokens."""
        return BYTE_VOCAB_SIZE + len(self._special_ids)

    @property
    def special_tokens(self) -> Tuple[str, ...]:
        """The special token names, in id order."""
        return tuple(self._special_ids)

    def special_token_id(self, name: str) -> int:
        """The id of special token ``name``; ``KeyError`` if this tokenizer lacks it."""
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"special token {name!r} not enabled (have: {self.special_tokens})") from None

    @property
    def bos_id(self) -> Optional[int]:
        return self._special_ids.get("bos")

    @property
    def eos_id(self) -> Optional[int]:
        return self._special_ids.get("eos")

    @property
    def pad_id(self) -> Optional[int]:
        return self._special_ids.get("pad")

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        """UTF-8 encode ``text``; optionally wrap in BOS/EOS (which must be enabled)."""
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.special_token_id("bos"))
        if add_eos:
            ids.append(self.special_token_id("eos"))
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """``uint8[num_bytes]`` token ids of ``text`` (bytes only, no special tokens)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Decode ids to text; invalid UTF-8 becomes U+FFFD (``errors="replace"``).

        Special tokens are dropped, or rendered as ``<|name|>`` when
        ``skip_special_tokens=False``. Ids outside ``[0, vocab_size)`` raise ``ValueError``.
        """
        pieces: List[str] = []
        run = bytearray()
        for raw in ids:
            token = int(raw)
            if 0 <= token < BYTE_VOCAB_SIZE:
                run.append(token)
                continue
            name = self._special_names.get(token)
            if name is None:
                raise ValueError(f"token id {token} out of range for vocab_size {self.vocab_size}")
            if not skip_special_tokens:
                pieces.append(run.decode("utf-8", errors="replace"))
                run.clear()
                pieces.append(f"<|{name}|>")
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def __repr__(self) -> str:
        return f"ByteTokenizer(special_tokens={self.special_tokens!r}, vocab_size={self.vocab_size})"


def _counts(tokens: TokenArray, minlength: int) -> np.ndarray:
    array = np.asarray(tokens).reshape(-1)
    if array.size == 0:
        raise ValueError("need at least one token")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {array.dtype}")
    if array.min() < 0:
        raise ValueError("token ids must be non-negative")
    return np.bincount(array.astype(np.int64, copy=False), minlength=minlength)


def unigram_entropy_nats(tokens: TokenArray) -> float:
    """Entropy (nats/token) of the empirical token distribution of ``tokens``.

    This is the cross-entropy a unigram model fitted to ``tokens`` achieves on ``tokens``
    themselves: the "unigram baseline" loss. It is 3.26 nats for the ``pydoc_topics`` training
    bytes (a uniform byte model scores ``ln 256 = 5.55``).

    Args:
        tokens: 1-D (or any shape, flattened) non-negative integer ids.
    """
    counts = _counts(tokens, 1)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def unigram_cross_entropy_nats(
    train_tokens: TokenArray, eval_tokens: TokenArray, vocab_size: int, smoothing: float = 1.0
) -> float:
    """Cross-entropy (nats/token) on ``eval_tokens`` of a unigram model fitted on ``train_tokens``.

    Uses additive (Laplace) ``smoothing`` over ``vocab_size`` ids so unseen ids have non-zero
    probability: the held-out counterpart of :func:`unigram_entropy_nats`, directly
    comparable to a model's validation loss.
    """
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    train_counts = _counts(train_tokens, vocab_size)
    eval_counts = _counts(eval_tokens, vocab_size)
    if train_counts.size > vocab_size or eval_counts.size > vocab_size:
        raise ValueError(f"token ids must be < vocab_size={vocab_size}")
    log_probs = np.log(train_counts + smoothing) - math.log(train_counts.sum() + smoothing * vocab_size)
    return float(-(eval_counts * log_probs).sum() / eval_counts.sum())
