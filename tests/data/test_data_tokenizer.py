"""ByteTokenizer round trips and the unigram baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from paddle_semoe.data import ByteTokenizer, unigram_cross_entropy_nats, unigram_entropy_nats


@pytest.mark.parametrize("text", ["", "hello world", "héllo wörld — ünïcode ✓ 日本語 🙂", "a\x00b\n\t"])
def test_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_array(text).dtype == np.uint8
    assert tok.decode(tok.encode_array(text)) == text


def test_special_tokens() -> None:
    tok = ByteTokenizer(("bos", "eos", "pad"))
    assert tok.vocab_size == 259 and ByteTokenizer().vocab_size == 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    ids = tok.encode("é", add_bos=True, add_eos=True)
    assert ids == [256, 0xC3, 0xA9, 257]
    assert tok.decode(ids) == "é"
    assert tok.decode(ids, skip_special_tokens=False) == "<|bos|>é<|eos|>"
    assert ByteTokenizer(("eos",)).eos_id == 256 and ByteTokenizer(("eos",)).bos_id is None
    with pytest.raises(KeyError, match="bos"):
        ByteTokenizer().encode("x", add_bos=True)
    with pytest.raises(ValueError, match="unknown special token"):
        ByteTokenizer(("cls",))
    with pytest.raises(ValueError, match="out of range"):
        ByteTokenizer().decode([256])


def test_invalid_utf8_is_replaced() -> None:
    tok = ByteTokenizer()
    assert tok.decode([0x68, 0xC3]) == "h\ufffd"  # truncated multi-byte sequence


def test_unigram_entropy() -> None:
    assert unigram_entropy_nats(np.zeros(10, dtype=np.uint8)) == 0.0
    assert math.isclose(unigram_entropy_nats([0, 1, 2, 3]), math.log(4))
    assert math.isclose(unigram_entropy_nats(np.arange(256, dtype=np.uint8)), math.log(256))
    with pytest.raises(ValueError):
        unigram_entropy_nats([])


def test_unigram_cross_entropy() -> None:
    train = np.array([0, 0, 1, 1], dtype=np.int64)
    # without smoothing effects (large counts) it matches the entropy of the same data
    big = np.repeat(train, 10_000)
    assert math.isclose(unigram_cross_entropy_nats(big, big, vocab_size=2), math.log(2), rel_tol=1e-6)
    # an unseen id still has finite loss thanks to smoothing
    assert math.isfinite(unigram_cross_entropy_nats(train, [2], vocab_size=3))
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_cross_entropy_nats(train, [5], vocab_size=3)
