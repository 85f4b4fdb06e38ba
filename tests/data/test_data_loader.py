"""TokenBatcher: shapes, determinism, rank sharding, exact resume; val_batches."""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest

from paddle_semoe.data import TokenBatcher, split_inputs_targets, val_batches

SEQ = 16
GLOBAL = 8


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    # token i is i, so a row's first token is its start position
    return np.arange(5_000, dtype=np.int32)


def test_shapes_dtypes_and_shift(tokens: np.ndarray) -> None:
    batcher = TokenBatcher(tokens, GLOBAL, SEQ, seed=3)
    batch = next(batcher)
    assert batch.shape == (GLOBAL, SEQ + 1) and batch.dtype == np.int64
    inputs, targets = split_inputs_targets(batch)
    assert inputs.shape == targets.shape == (GLOBAL, SEQ)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    # each row is a contiguous window of the data
    assert np.all(np.diff(batch, axis=1) == 1)


def test_uint8_corpus_bytes_become_int64_ids() -> None:
    data = np.frombuffer(bytes(range(256)) * 4, dtype=np.uint8)
    batch = next(TokenBatcher(data, 2, 8, seed=0))
    assert batch.dtype == np.int64 and batch.min() >= 0 and batch.max() <= 255


def test_deterministic_and_seed_dependent(tokens: np.ndarray) -> None:
    a = list(islice(TokenBatcher(tokens, GLOBAL, SEQ, seed=1), 5))
    b = list(islice(TokenBatcher(tokens, GLOBAL, SEQ, seed=1), 5))
    c = list(islice(TokenBatcher(tokens, GLOBAL, SEQ, seed=2), 5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_epoch_covers_disjoint_windows_and_epochs_differ(tokens: np.ndarray) -> None:
    batcher = TokenBatcher(tokens, GLOBAL, SEQ, seed=0)
    steps = batcher.steps_in_epoch(0)
    rows = np.concatenate(list(islice(batcher, steps)))
    assert batcher.epoch == 0 and batcher.step == steps
    # one epoch: non-overlapping windows on a common grid, nearly all of the data
    starts = np.sort(rows[:, 0])
    assert np.all(np.diff(starts) >= SEQ) and np.all(np.diff(starts) % SEQ == 0)
    assert rows.shape[0] == steps * GLOBAL > (tokens.size // SEQ) - GLOBAL - 2
    next(batcher)
    assert batcher.epoch == 1 and batcher.step == 1
    assert not np.array_equal(batcher.global_batch(0, 0), batcher.global_batch(1, 0))


@pytest.mark.parametrize("world", [2, 4])
def test_rank_sharding_disjoint_and_covering(tokens: np.ndarray, world: int) -> None:
    single = TokenBatcher(tokens, GLOBAL, SEQ, seed=5)
    ranks = [TokenBatcher(tokens, GLOBAL, SEQ, seed=5, rank=r, world_size=world) for r in range(world)]
    for _ in range(3):
        full = next(single)
        parts = [next(b) for b in ranks]
        assert all(p.shape == (GLOBAL // world, SEQ + 1) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), full)


@pytest.mark.parametrize("consumed", [0, 3, 7])
def test_resume_matches_uninterrupted_run(tokens: np.ndarray, consumed: int) -> None:
    big_seq, big_batch = 64, 16  # 4 steps per epoch, so the resume crosses epoch boundaries
    reference = list(islice(TokenBatcher(tokens, big_batch, big_seq, seed=11), consumed + 6))
    first = TokenBatcher(tokens, big_batch, big_seq, seed=11)
    for _ in range(consumed):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint manifest
    resumed = TokenBatcher(tokens, big_batch, big_seq, seed=999)  # seed comes from the state
    resumed.load_state_dict(state)
    for expected in reference[consumed:]:
        np.testing.assert_array_equal(next(resumed), expected)


def test_resume_with_another_world_size(tokens: np.ndarray) -> None:
    one = TokenBatcher(tokens, GLOBAL, SEQ, seed=4)
    reference = list(islice(one, 5))
    state = TokenBatcher(tokens, GLOBAL, SEQ, seed=4)
    for _ in range(3):
        next(state)
    ranks = [TokenBatcher(tokens, GLOBAL, SEQ, rank=r, world_size=2) for r in range(2)]
    for b in ranks:
        b.load_state_dict(state.state_dict())
    for expected in reference[3:]:
        np.testing.assert_array_equal(np.concatenate([next(b) for b in ranks]), expected)


def test_resume_refuses_mismatches(tokens: np.ndarray) -> None:
    state = TokenBatcher(tokens, GLOBAL, SEQ).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        TokenBatcher(tokens, GLOBAL, SEQ * 2).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        TokenBatcher(tokens, GLOBAL * 2, SEQ).load_state_dict(state)
    changed = tokens.copy()
    changed[100] += 1
    with pytest.raises(ValueError, match="tokens_sha256"):
        TokenBatcher(changed, GLOBAL, SEQ).load_state_dict(state)
    batcher = TokenBatcher(tokens, GLOBAL, SEQ)
    with pytest.raises(ValueError, match="step"):
        batcher.load_state_dict({**state, "step": 10**6})
    assert batcher.step == 0 and batcher.epoch == 0  # unchanged after a refused load
    with pytest.raises(ValueError, match="format"):
        batcher.load_state_dict({})


def test_bad_arguments(tokens: np.ndarray) -> None:
    with pytest.raises(ValueError, match="divisible"):
        TokenBatcher(tokens, 6, SEQ, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        TokenBatcher(tokens, GLOBAL, SEQ, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than global_batch_size"):
        TokenBatcher(tokens[:100], GLOBAL, SEQ)
    with pytest.raises(ValueError, match="1-D"):
        TokenBatcher(tokens.reshape(50, 100), GLOBAL, SEQ)


def test_val_batches_deterministic_and_ordered(tokens: np.ndarray) -> None:
    batches = list(val_batches(tokens, 4, SEQ))
    assert batches and all(b.shape == (4, SEQ + 1) and b.dtype == np.int64 for b in batches)
    assert all(np.array_equal(x, y) for x, y in zip(batches, val_batches(tokens, 4, SEQ)))
    rows = np.concatenate(batches)
    expected_starts = np.arange(rows.shape[0]) * SEQ
    np.testing.assert_array_equal(rows[:, 0], expected_starts)
    assert len(batches) == ((tokens.size - 1) // SEQ) // 4
    assert len(list(val_batches(tokens, 4, SEQ, max_batches=3))) == 3
    partial = list(val_batches(tokens, 4, SEQ, drop_last=False))
    assert sum(b.shape[0] for b in partial) == (tokens.size - 1) // SEQ


def test_val_batches_sharded(tokens: np.ndarray) -> None:
    full = list(val_batches(tokens, 4, SEQ))
    halves = [list(val_batches(tokens, 2, SEQ, rank=r, world_size=2)) for r in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(full)
    for j, batch in enumerate(full):
        np.testing.assert_array_equal(np.concatenate([halves[0][j], halves[1][j]]), batch)
    with pytest.raises(ValueError, match="too short|fewer than one batch"):
        val_batches(tokens[:20], 4, SEQ)
