"""Durable files: atomic writes, checksums, records, verification that names the file."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from paddle_semoe.io.files import (
    FileRecord,
    IntegrityError,
    record_of,
    records_from_json,
    records_to_json,
    sha256_bytes,
    sha256_file,
    sha256_from_words,
    sha256_to_words,
    verify_file,
    verify_records,
    write_atomic,
)


def test_write_atomic_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    write_atomic(path, b"old")
    write_atomic(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_write_atomic_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "a.bin"
    write_atomic(path, b"good")
    with pytest.raises(TypeError):  # fails inside the write, after the temp file exists
        write_atomic(path, object())  # type: ignore[arg-type]
    assert path.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_sha256_of_bytes_file_and_words_agree_with_hashlib(tmp_path):
    data = np.arange(100_000, dtype=np.int32).tobytes()
    (tmp_path / "x").write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_bytes(data) == sha256_file(tmp_path / "x") == want
    words = sha256_to_words(want)
    assert words.dtype == np.int64 and words.shape == (4,)
    assert sha256_from_words(words) == want
    assert record_of(tmp_path / "x") == FileRecord("x", want, len(data))


def test_records_round_trip_through_json():
    recs = [FileRecord("rank_00000.npz", "ab" * 32, 10), FileRecord("experts/index.json", "cd" * 32, 3)]
    assert list(records_from_json(records_to_json(recs)).values()) == recs


def test_verify_names_the_missing_truncated_or_corrupt_file(tmp_path):
    path = tmp_path / "shard.npz"
    write_atomic(path, b"0123456789")
    rec = record_of(path)
    verify_records(tmp_path, [rec])
    path.write_bytes(b"01234")
    with pytest.raises(IntegrityError, match=r"shard.npz is truncated or altered: 5 bytes, manifest says 10"):
        verify_file(path, rec.sha256, rec.bytes)
    path.write_bytes(b"0123456780")
    with pytest.raises(IntegrityError, match=r"shard.npz is corrupt"):
        verify_file(path, rec.sha256, rec.bytes)
    path.unlink()

    class PkgError(RuntimeError):
        pass

    with pytest.raises(PkgError, match=r"inference package file missing: .*shard.npz"):
        verify_file(path, rec.sha256, rec.bytes, kind="inference package", error=PkgError)
