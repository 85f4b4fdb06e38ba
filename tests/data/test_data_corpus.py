"""Corpus registry, determinism, sha256 and the document split."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from paddle_semoe.data import corpus_names, expected_sha256, load_corpus, load_documents, load_split
from paddle_semoe.data.corpus import Document, corpus_sha256, split_documents, stdlib_docstring_documents


@pytest.fixture(scope="module")
def topics_split():
    return load_split("pydoc_topics")


def test_registry_and_unknown_name() -> None:
    assert {"pydoc_topics", "stdlib_docstrings", "python_docs"} <= set(corpus_names())
    with pytest.raises(ValueError, match="unknown corpus 'nope'.*pydoc_topics"):
        load_corpus("nope")


def test_pydoc_topics_is_sizeable_english_and_deterministic(topics_split) -> None:
    data = load_corpus("pydoc_topics")
    assert len(data) > 400_000
    assert data == load_corpus("pydoc_topics")
    assert b"statement" in data and data.count(b" the ") > 1000
    assert corpus_sha256(data) == topics_split.sha256
    known = expected_sha256("pydoc_topics")
    if known is not None:  # recorded for this exact CPython version
        assert topics_split.sha256 == known


def test_split_is_by_whole_documents(topics_split) -> None:
    docs = load_documents("pydoc_topics")
    by_name = {d.name: d for d in docs}
    val_text = b"".join(by_name[n].text.encode() for n in topics_split.val_documents)
    assert topics_split.val.tobytes() == val_text
    assert topics_split.train.size + topics_split.val.size == len(load_corpus("pydoc_topics"))
    assert topics_split.train.dtype == np.uint8 and topics_split.val.dtype == np.uint8
    assert not topics_split.train.flags.writeable
    assert 0.02 < topics_split.val.size / (topics_split.train.size + topics_split.val.size) < 0.15
    assert topics_split.num_documents == len(docs)


def test_split_deterministic_within_run(topics_split) -> None:
    again = load_split("pydoc_topics")
    assert again.sha256 == topics_split.sha256
    assert again.val_documents == topics_split.val_documents
    np.testing.assert_array_equal(again.train, topics_split.train)
    np.testing.assert_array_equal(again.val, topics_split.val)


def test_split_documents_fraction_and_spread() -> None:
    docs = [Document(f"d{i}", "x" * (10 + (i * 7) % 13) + "\n\n") for i in range(400)]
    train, val = split_documents(docs, 0.1)
    val_bytes = sum(len(d.text) for d in val)
    total = sum(len(d.text) for d in docs)
    assert abs(val_bytes / total - 0.1) < 0.01
    positions = [int(d.name[1:]) for d in val]
    assert positions == sorted(positions) and max(np.diff(positions)) <= 15  # evenly spread
    assert len(train) + len(val) == len(docs)
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(docs[:1], 0.1)
    tiny_train, tiny_val = split_documents(docs[:2], 0.01)
    assert len(tiny_train) == 1 and len(tiny_val) == 1


def test_stdlib_docstrings_subset_deterministic() -> None:
    first = stdlib_docstring_documents(["json", "textwrap"])
    assert first == stdlib_docstring_documents(["json", "textwrap"])
    names = [d.name for d in first]
    assert names == sorted(names) and "module:json.decoder" in names and "module:textwrap" in names
    assert all(d.text.endswith("\n\n") and not d.text.endswith("\n\n\n") for d in first)
    assert "Text wrapping and filling" in "".join(d.text for d in first)


def test_python_docs_reaches_megabytes() -> None:
    data = load_corpus("python_docs")  # parses the stdlib sources: the slowest test here
    assert len(data) > 1_500_000
    known = expected_sha256("python_docs")
    if known is not None:
        assert corpus_sha256(data) == known, f"python_docs changed on Python {sys.version.split()[0]}"
