"""Plain-numpy model of the expert exchange over all ranks at once (the tests' oracle).

Deliberately written with loops and no code from :mod:`paddle_semoe.comm.layout`, so that it
is an independent statement of the contract in :mod:`paddle_semoe.comm.alltoall`.
It also makes the self-describing payloads the tests use: row values encode
``(source rank, source row, expert)``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "decode_payload",
    "make_payload",
    "random_counts",
    "reference_combine",
    "reference_dispatch",
]

#: Columns of a payload row: source rank, source row index, global expert, then filler.
PAYLOAD_COLUMNS = 3


def random_counts(
    rng: np.random.Generator, num_experts: int, max_rows: int, empty_fraction: float = 0.3
) -> np.ndarray:
    """Uneven int32 counts ``[E]`` with some experts empty."""
    counts = rng.integers(0, max_rows + 1, size=num_experts)
    counts[rng.random(num_experts) < empty_fraction] = 0
    return counts.astype(np.int32)


def make_payload(rank: int, counts: np.ndarray, width: int, padding: int = 0) -> np.ndarray:
    """float32 ``[sum(counts) + padding, width]`` rows, expert-major, encoding their origin.

    Row ``i`` for expert ``x`` holds ``[rank, i, x, rank + i/8 + x/64 + c/512 ...]``; padding
    rows hold ``-1``. ``width >= 3``.
    """
    if width < PAYLOAD_COLUMNS:
        raise ValueError(f"width must be >= {PAYLOAD_COLUMNS}, got {width}")
    n = int(np.sum(counts))
    out = np.full((n + padding, width), -1.0, dtype=np.float32)
    experts = np.repeat(np.arange(len(counts)), counts)
    rows = np.arange(n)
    out[:n, 0] = rank
    out[:n, 1] = rows
    out[:n, 2] = experts
    if width > PAYLOAD_COLUMNS:
        c = np.arange(width - PAYLOAD_COLUMNS)[None, :]
        out[:n, PAYLOAD_COLUMNS:] = rank + rows[:, None] / 8.0 + experts[:, None] / 64.0 + c / 512.0
    return out


def decode_payload(rows: np.ndarray) -> np.ndarray:
    """int64 ``[n, 3]``: (source rank, source row, expert) of payload rows."""
    return np.asarray(rows)[:, :PAYLOAD_COLUMNS].round().astype(np.int64)


def reference_dispatch(
    rows: list[np.ndarray], counts: list[np.ndarray], num_local_experts: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Dispatch for every EP rank: (local rows ``[R_loc, D]``, local counts int64 ``[El]``)."""
    P, El = len(rows), num_local_experts
    offsets = [np.concatenate(([0], np.cumsum(c)[:-1])).astype(np.int64) for c in counts]
    local_rows, local_counts = [], []
    for d in range(P):
        blocks, lc = [], np.zeros(El, dtype=np.int64)
        for e in range(El):
            x = d * El + e
            for s in range(P):
                n = int(counts[s][x])
                blocks.append(rows[s][offsets[s][x] : offsets[s][x] + n])
                lc[e] += n
        width = rows[0].shape[1]
        local_rows.append(np.concatenate(blocks) if blocks else np.zeros((0, width), rows[0].dtype))
        local_counts.append(lc)
    return local_rows, local_counts


def reference_combine(
    local_out: list[np.ndarray], counts: list[np.ndarray], num_local_experts: int, num_rows: list[int]
) -> list[np.ndarray]:
    """Combine for every EP rank: rows back in sender layout, ``[num_rows[s], D]``, zero padding."""
    P, El = len(local_out), num_local_experts
    width = local_out[0].shape[1]
    out = [np.zeros((num_rows[s], width), dtype=local_out[0].dtype) for s in range(P)]
    offsets = [np.concatenate(([0], np.cumsum(c)[:-1])).astype(np.int64) for c in counts]
    for d in range(P):
        pos = 0
        for e in range(El):
            x = d * El + e
            for s in range(P):
                n = int(counts[s][x])
                out[s][offsets[s][x] : offsets[s][x] + n] = local_out[d][pos : pos + n]
                pos += n
    return out
