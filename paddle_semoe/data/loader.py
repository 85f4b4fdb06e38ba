"""Deterministic, rank-sharded, exactly resumable batches of token windows (pure numpy).

:class:`TokenBatcher` turns one long 1-D token array into an endless stream of training
batches. Each batch row is a window of ``seq_len + 1`` consecutive tokens: inputs are
``row[:-1]`` and targets ``row[1:]`` (:func:`split_inputs_targets`).

Epoch ``e`` is planned from ``np.random.Generator(PCG64(SeedSequence([seed, e, STREAM])))``
alone (no global RNG): a random start offset in ``[0, seq_len)`` (so window boundaries move
between epochs), then non-overlapping windows starting at ``offset + i * seq_len`` in a random
order. Step ``s`` of the epoch takes the next ``global_batch_size`` windows of that order; rank
``r`` of ``world_size`` gets rows ``[r * B, (r + 1) * B)`` with ``B = global_batch_size //
world_size``, so the ranks' batches are disjoint and together form the global batch. Windows
that do not fill a last global batch are skipped for that epoch (different ones each epoch).

Because the global stream depends only on ``(tokens, seed, global_batch_size, seq_len)``, a
run can resume from :meth:`TokenBatcher.state_dict` with a different number of data-parallel
ranks and still see exactly the same global batches.

The stream is bit-identical across machines for a given numpy version; numpy does not
promise ``Generator.permutation`` streams across major versions.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Dict, Iterator, Mapping, Optional, Protocol, Tuple, Union

import numpy as np

__all__ = ["TokenBatcher", "split_inputs_targets", "val_batches"]

logger = logging.getLogger(__name__)

_STREAM = 0x5E30E  # separates this RNG stream from other users of the same seed
_STATE_FORMAT = "paddle_semoe.data.TokenBatcher/1"


class TokenViewLike(Protocol):
    """A virtual 1-D token array (e.g. :class:`~paddle_semoe.data.dataset.TokenView`)."""

    ndim: int

    @property
    def size(self) -> int: ...

    @property
    def dtype(self) -> np.dtype: ...

    def take(self, index: np.ndarray) -> np.ndarray: ...


Tokens = Union[np.ndarray, TokenViewLike]
"""What the batchers read: a 1-D integer array, or a view with ``take``."""


def _is_view(tokens: Any) -> bool:
    """A virtual token array (e.g. :class:`~paddle_semoe.data.dataset.TokenView`): has ``take``."""
    return not isinstance(tokens, np.ndarray) and callable(getattr(tokens, "take", None)) and hasattr(tokens, "size")


def _check_tokens(tokens: Tokens, what: str) -> Tokens:
    if _is_view(tokens):
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{what} must be a 1-D integer token view")
        return tokens
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D token array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must hold integer token ids, got dtype {array.dtype}")
    return array


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _gather(tokens: Tokens, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """``int64[len(starts), seq_len + 1]``: the windows ``tokens[s : s + seq_len + 1]``."""
    index = starts.astype(np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    if isinstance(tokens, np.ndarray):
        return tokens[index].astype(np.int64)
    return tokens.take(index)


def split_inputs_targets(batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Split ``[B, S + 1]`` windows into inputs ``[B, S]`` and next-token targets ``[B, S]`` (views)."""
    if batch.ndim != 2 or batch.shape[1] < 2:
        raise ValueError(f"expected windows of shape [batch, seq_len + 1], got {batch.shape}")
    return batch[:, :-1], batch[:, 1:]


class TokenBatcher:
    """Endless, deterministic, rank-sharded training batches with exact resume.

    Args:
        tokens: 1-D integer token ids (e.g. ``CorpusSplit.train``, ``uint8``); not copied, so
            keep it unchanged while the batcher is in use.
        global_batch_size: windows per step summed over all data-parallel ranks.
        seq_len: tokens per input row; each row holds ``seq_len + 1`` tokens.
        seed: selects the stream; epoch ``e`` depends only on ``(seed, e)``.
        rank: this data-parallel rank, in ``[0, world_size)``.
        world_size: number of data-parallel ranks; must divide ``global_batch_size``.
        random_offset: shift window boundaries by a random offset each epoch (default).

    Iterating yields ``int64[global_batch_size // world_size, seq_len + 1]`` arrays forever,
    rolling over epochs; bound the loop by steps, e.g.
    ``for step, batch in zip(range(start, max_steps), batcher)``.

    Raises:
        ValueError: bad sizes, ``rank``/``world_size``, or ``tokens`` too short for one global
            batch in every epoch.
    """

    def __init__(
        self,
        tokens: Tokens,
        global_batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        random_offset: bool = True,
    ) -> None:
        self._tokens = _check_tokens(tokens, "tokens")
        _check_positive(global_batch_size=global_batch_size, seq_len=seq_len, world_size=world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by world_size={world_size}"
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.global_batch_size = int(global_batch_size)
        self.seq_len = int(seq_len)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.batch_size = self.global_batch_size // self.world_size
        self.random_offset = bool(random_offset)
        self._seed = int(seed)
        self._epoch = 0
        self._step = 0
        self._plan: Optional[Tuple[int, int, np.ndarray]] = None  # (epoch, offset, order)
        self._sha256: Optional[str] = None
        worst_offset = self.seq_len - 1 if self.random_offset else 0
        fewest = self._num_windows(worst_offset)
        if fewest < self.global_batch_size:
            raise ValueError(
                f"{self._tokens.size} tokens give only {fewest} windows of {self.seq_len + 1} tokens, "
                f"fewer than global_batch_size={self.global_batch_size}"
            )

    # ----------------------------------------------------------------------------- planning
    def _num_windows(self, offset: int) -> int:
        return max(0, (self._tokens.size - 1 - offset) // self.seq_len)

    def _epoch_plan(self, epoch: int) -> Tuple[int, np.ndarray]:
        """``(offset, order)`` of ``epoch``: window start offset and window order ``int64[W]``."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self._seed, epoch, _STREAM])))
            offset = int(rng.integers(0, self.seq_len)) if self.random_offset else 0
            order = rng.permutation(self._num_windows(offset))
            self._plan = (epoch, offset, order)
        return self._plan[1], self._plan[2]

    def steps_in_epoch(self, epoch: int) -> int:
        """Number of global batches in ``epoch`` (it can differ by one between epochs)."""
        offset, order = self._epoch_plan(epoch)
        return order.size // self.global_batch_size

    # ---------------------------------------------------------------------------- iteration
    @property
    def seed(self) -> int:
        return self._seed

    @property
    def epoch(self) -> int:
        """Epoch of the next batch (before rolling over past an epoch's last step)."""
        return self._epoch

    @property
    def step(self) -> int:
        """Global batches already taken from the current epoch."""
        return self._step

    def __iter__(self) -> "TokenBatcher":
        return self

    def __next__(self) -> np.ndarray:
        """The next ``int64[batch_size, seq_len + 1]`` batch of this rank."""
        if self._step >= self.steps_in_epoch(self._epoch):
            self._epoch += 1
            self._step = 0
        offset, order = self._epoch_plan(self._epoch)
        first = self._step * self.global_batch_size + self.rank * self.batch_size
        starts = offset + order[first : first + self.batch_size] * self.seq_len
        self._step += 1
        return _gather(self._tokens, starts, self.seq_len)

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """``int64[global_batch_size, seq_len + 1]``: all ranks' rows of one step (for tests/tools)."""
        if not 0 <= step < self.steps_in_epoch(epoch):
            raise ValueError(f"step {step} out of range for epoch {epoch}")
        offset, order = self._epoch_plan(epoch)
        first = step * self.global_batch_size
        return _gather(self._tokens, offset + order[first : first + self.global_batch_size] * self.seq_len, self.seq_len)

    # ------------------------------------------------------------------------------- resume
    def _tokens_sha256(self) -> str:
        if self._sha256 is None and _is_view(self._tokens):
            self._sha256 = str(getattr(self._tokens, "fingerprint"))
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(np.ascontiguousarray(self._tokens).data).hexdigest()
        return self._sha256

    def state_dict(self) -> Dict[str, Any]:
        """Position in the stream as plain JSON-serialisable values.

        Holds ``seed``, ``epoch``, ``step`` and what must match on resume (``seq_len``,
        ``global_batch_size``, ``num_tokens``, ``tokens_sha256``, ``random_offset``). Not the
        rank or world size: resuming under another data-parallel degree is allowed.
        """
        return {
            "format": _STATE_FORMAT,
            "seed": self._seed,
            "epoch": self._epoch,
            "step": self._step,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "random_offset": self.random_offset,
            "num_tokens": int(self._tokens.size),
            "tokens_dtype": str(self._tokens.dtype),
            "tokens_sha256": self._tokens_sha256(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the run that produced ``state`` stopped.

        The seed is taken from ``state``. Raises ``ValueError`` naming the field when the
        state comes from a different format, window length, global batch size or token data.
        """
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a TokenBatcher state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        expected = {
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "random_offset": self.random_offset,
            "num_tokens": int(self._tokens.size),
            "tokens_dtype": str(self._tokens.dtype),
        }
        for key, mine in expected.items():
            if state.get(key) != mine:
                raise ValueError(f"cannot resume data loader: {key} is {state.get(key)!r} in the state but {mine!r} here")
        if state.get("tokens_sha256") != self._tokens_sha256():
            raise ValueError("cannot resume data loader: the token data differs from the state's (tokens_sha256)")
        for key in ("epoch", "step", "seed"):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"cannot resume data loader: bad {key} {value!r} in the state")
        epoch, step, seed = int(state["epoch"]), int(state["step"]), int(state["seed"])
        previous = (self._seed, self._epoch, self._step, self._plan)
        self._seed, self._epoch, self._step, self._plan = seed, epoch, step, None
        if step > self.steps_in_epoch(epoch):
            steps = self.steps_in_epoch(epoch)
            self._seed, self._epoch, self._step, self._plan = previous
            raise ValueError(f"cannot resume data loader: step {step} is beyond epoch {epoch}'s {steps} steps")
        if seed != previous[0]:
            logger.info("data loader: took seed %d from the resumed state (was %d)", seed, previous[0])


def val_batches(
    tokens: Tokens,
    batch_size: int,
    seq_len: int,
    max_batches: Optional[int] = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
) -> Iterator[np.ndarray]:
    """Deterministic evaluation batches: consecutive non-overlapping windows, in order.

    Window ``i`` is ``tokens[i * seq_len : i * seq_len + seq_len + 1]``. Batch ``j`` covers
    windows ``[j * G, (j + 1) * G)`` with ``G = batch_size * world_size``, and rank ``r`` gets
    its ``r``-th block of ``batch_size`` rows, so every rank yields the same number of batches.

    Args:
        tokens: 1-D integer ids (e.g. ``CorpusSplit.val``).
        batch_size: rows per batch on this rank.
        seq_len: inputs per row (rows hold ``seq_len + 1`` tokens).
        max_batches: stop after this many batches (``None``: all full batches).
        rank, world_size: data-parallel position.
        drop_last: skip the last, partial batch. ``False`` is allowed only with
            ``world_size == 1`` and then yields it with fewer rows.

    Yields:
        ``int64[batch_size, seq_len + 1]`` arrays.

    Raises:
        ValueError (at call time, not first iteration): bad arguments, or ``tokens`` too short
        for a single batch.
    """
    array = _check_tokens(tokens, "val tokens")
    _check_positive(batch_size=batch_size, seq_len=seq_len, world_size=world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if max_batches is not None:
        _check_positive(max_batches=max_batches)
    if not drop_last and world_size != 1:
        raise ValueError("drop_last=False needs world_size == 1 (ranks must see equal batch counts)")
    num_windows = max(0, (array.size - 1) // seq_len)
    group = batch_size * world_size
    count = num_windows // group
    if not drop_last and num_windows % group:
        count += 1
    if count == 0:
        raise ValueError(
            f"{array.size} val tokens give {num_windows} windows of {seq_len + 1} tokens, "
            f"fewer than one batch of {group}"
        )
    if max_batches is not None:
        count = min(count, max_batches)

    def generate() -> Iterator[np.ndarray]:
        for j in range(count):
            first = j * group + rank * batch_size
            last = min(first + batch_size, num_windows)
            starts = np.arange(first, last, dtype=np.int64) * seq_len
            yield _gather(array, starts, seq_len)

    return generate()
