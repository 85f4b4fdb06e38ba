"""Blending prepared datasets: proportions, rank sharding, exact resume, refusals."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from paddle_semoe.config import ConfigError, load_config
from paddle_semoe.data import (
    BlendedBatcher,
    DatasetError,
    DatasetsSplit,
    check_tokenizer_on_resume,
    check_weights,
    load_training_split,
    val_batches,
)
from paddle_semoe.data.prepare import PrepareOptions, prepare_dataset
from paddle_semoe.data.subword import train_byte_level_bpe
from paddle_semoe.engine.config import TrainConfig

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "gpt_moe_tiny.yaml"


def _sources():
    # three token sources told apart by value range
    return [np.arange(0, 20_000) % 1000, 1000 + np.arange(0, 5_000) % 1000, 2000 + np.arange(0, 50_000) % 1000]


def test_blend_proportions_within_2_percent_over_10k_sequences():
    weights = [0.5, 0.2, 0.3]
    batcher = BlendedBatcher(_sources(), [5.0, 2.0, 3.0], 40, 16, seed=7)
    rows = np.concatenate([b[:, 0] // 1000 for b in islice(batcher, 250)])  # 10,000 sequences
    assert rows.size == 10_000
    share = np.bincount(rows, minlength=3) / rows.size
    np.testing.assert_allclose(share, weights, atol=0.02)
    np.testing.assert_array_equal(batcher.drawn, np.bincount(rows, minlength=3))
    # the small source (5k tokens = 312 windows) ran through several epochs
    assert batcher.state_dict()["sources"][1]["epoch"] >= 5


def test_rows_are_contiguous_windows_of_one_source():
    batch = next(BlendedBatcher(_sources(), [1, 1, 1], 12, 32, seed=1))
    assert batch.shape == (12, 33) and batch.dtype == np.int64
    diffs = np.diff(batch, axis=1)
    assert np.all((diffs == 1) | (diffs == -999))  # consecutive tokens (values wrap at 1000)
    assert np.all(batch // 1000 == batch[:, :1] // 1000)


def test_ranks_split_the_global_batch():
    one = BlendedBatcher(_sources(), [1, 2, 3], 8, 16, seed=3)
    r0 = BlendedBatcher(_sources(), [1, 2, 3], 8, 16, seed=3, rank=0, world_size=2)
    r1 = BlendedBatcher(_sources(), [1, 2, 3], 8, 16, seed=3, rank=1, world_size=2)
    for _ in range(30):
        np.testing.assert_array_equal(next(one), np.concatenate([next(r0), next(r1)]))


def test_exact_resume_also_under_another_world_size():
    ref = BlendedBatcher(_sources(), [1, 2, 3], 8, 16, seed=11)
    for _ in range(45):
        next(ref)
    state = ref.state_dict()
    expected = [next(ref) for _ in range(40)]
    again = BlendedBatcher(_sources(), [1, 2, 3], 8, 16, seed=0, rank=1, world_size=4)
    again.load_state_dict(state)
    for want in expected:
        np.testing.assert_array_equal(next(again), want[2:4])


def test_resume_refuses_other_weights_data_or_format():
    ref = BlendedBatcher(_sources(), [1, 2, 3], 8, 16, seed=11)
    next(ref)
    state = ref.state_dict()
    with pytest.raises(ValueError, match="weights"):
        BlendedBatcher(_sources(), [1, 1, 1], 8, 16).load_state_dict(state)
    other = _sources()
    other[2] = other[2][:-100]
    with pytest.raises(ValueError, match="dataset source2 differs"):
        BlendedBatcher(other, [1, 2, 3], 8, 16).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        BlendedBatcher(_sources(), [1, 2, 3], 16, 16).load_state_dict(state)
    with pytest.raises(ValueError, match="built-in corpus vs data.datasets"):
        BlendedBatcher(_sources(), [1, 2, 3], 8, 16).load_state_dict({"format": "paddle_semoe.data.TokenBatcher/1"})


def test_bad_weights_are_refused():
    with pytest.raises(DatasetError, match="weight of b is negative"):
        check_weights([1.0, -0.5], ["a", "b"])
    with pytest.raises(DatasetError, match="sum to 0"):
        check_weights([0, 0.0], ["a", "b"])
    with pytest.raises(DatasetError, match="finite"):
        check_weights([float("nan")], ["a"])
    with pytest.raises(ConfigError, match="must be a finite number >= 0"):
        load_config(TrainConfig, CONFIG, ["data.datasets=[{path: a, weight: -1}]"])
    with pytest.raises(ConfigError, match="weights sum to 0"):
        load_config(TrainConfig, CONFIG, ["data.datasets=[{path: a, weight: 0}, {path: b, weight: 0}]"])


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, topic_texts, bpe):
    root = tmp_path_factory.mktemp("two")
    for name, texts in (("a", topic_texts[:40]), ("b", topic_texts[40:])):
        (root / f"{name}.txt").write_text("".join(texts))
        prepare_dataset(
            [str(root / f"{name}.txt")], root / name, tokenizer=bpe, progress=False,
            options=PrepareOptions(doc_boundary="blank_line"),
        )
    return root


def test_datasets_split_blends_prepared_datasets(two_datasets, bpe):
    split = load_training_split(datasets=[(str(two_datasets / "a"), 3.0), (str(two_datasets / "b"), 1.0)], val_fraction=0.1, vocab_size=512)
    assert isinstance(split, DatasetsSplit)
    assert split.tokenizer_identity()["sha256"] == bpe.sha256
    batcher = split.batcher(16, 32, seed=0, rank=0, world_size=1)
    for _ in range(50):
        next(batcher)
    np.testing.assert_allclose(batcher.drawn / batcher.drawn.sum(), [0.75, 0.25], atol=0.01)
    # every row is a window of one of the datasets' training tokens
    a_train = np.concatenate(list(split.trains[0].iter_chunks()))
    row = next(batcher)[0]
    hits = [np.array_equal(a_train[i : i + 33], row) for i in range(a_train.size - 32)]
    b_train = np.concatenate(list(split.trains[1].iter_chunks()))
    hits_b = [np.array_equal(b_train[i : i + 33], row) for i in range(b_train.size - 32)]
    assert any(hits) or any(hits_b)
    # validation covers both datasets' held-out documents
    assert split.val.size == sum(v.size for v in (split.datasets[0].split(0.1)[1], split.datasets[1].split(0.1)[1]))
    assert next(val_batches(split.val, 4, 32)).shape == (4, 33)
    assert 0 < split.unigram_baseline(512) < np.log(512)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(two_datasets):
    with pytest.raises(DatasetError, match=r"has 512 tokens, more than model.vocab_size=256; set model.vocab_size >= 512"):
        DatasetsSplit([(str(two_datasets / "a"), 1.0)], 0.05, 256)


def test_datasets_with_different_tokenizers_cannot_be_blended(two_datasets, tmp_path, topic_texts):
    other = train_byte_level_bpe(iter(topic_texts[:20]), 300, name="other")
    (tmp_path / "c.txt").write_text("".join(topic_texts[:20]))
    prepare_dataset([str(tmp_path / "c.txt")], tmp_path / "c", tokenizer=other, progress=False, options=PrepareOptions(doc_boundary="blank_line"))
    with pytest.raises(DatasetError, match=r"different tokenizers: .*'bpe-512'.*'other'"):
        DatasetsSplit([(str(two_datasets / "a"), 1.0), (str(tmp_path / "c"), 1.0)], 0.05, 512)


def test_resume_with_another_tokenizer_is_refused_by_name(bpe):
    mine = {"name": "bpe-512", "sha256": bpe.sha256, "kind": "hf"}
    check_tokenizer_on_resume(mine, mine, "ckpt")
    with pytest.raises(ValueError, match=r"trained with tokenizer 'byte', but this job's data uses tokenizer 'bpe-512'"):
        check_tokenizer_on_resume(None, mine, "ckpt")
    with pytest.raises(ValueError, match=r"trained with tokenizer 'other' \(sha256 000000000000\)"):
        check_tokenizer_on_resume({"name": "other", "sha256": "0" * 64}, mine, "ckpt")
