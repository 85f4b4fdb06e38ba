"""Shared fixtures for the prepared-dataset tests: a small corpus on disk, a trained BPE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paddle_semoe.data import load_documents
from paddle_semoe.data.subword import HFTokenizer, train_byte_level_bpe


@pytest.fixture(scope="session")
def topic_texts() -> list[str]:
    """The pydoc topics (~0.47 MB of English prose), one string per document."""
    return [d.text for d in load_documents("pydoc_topics")]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, topic_texts) -> Path:
    """A directory of text files (one topic each, some non-ASCII) plus a JSON-lines file."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "txt").mkdir()
    half = len(topic_texts) // 2
    for i, text in enumerate(topic_texts[:half]):
        extra = "Ünïcödé ✓ — naïve café 😀\n" if i % 7 == 0 else ""
        (root / "txt" / f"doc{i:03d}.txt").write_text(extra + text, encoding="utf-8")
    with open(root / "more.jsonl", "w", encoding="utf-8") as fh:
        for i, text in enumerate(topic_texts[half:]):
            fh.write(json.dumps({"text": text, "meta": {"id": i}}) + "\n")
    return root


@pytest.fixture(scope="session")
def bpe(topic_texts) -> HFTokenizer:
    return train_byte_level_bpe(iter(topic_texts), 512)
