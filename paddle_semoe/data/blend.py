"""Training on prepared datasets: weighted blending, exact resume, rank sharding.

:class:`BlendedBatcher` draws each sequence of the global batch from one of several token
sources (memory-mapped :class:`~paddle_semoe.data.dataset.TokenView` s, or arrays). Which
source the ``n``-th sequence comes from is fixed by the weights alone: the source with the
largest deficit ``w_i * (n + 1) - drawn_i`` (ties: the first), so after any ``n`` sequences each
source has supplied ``w_i * n`` of them to within one sequence (exact proportions, no sampling
noise). Within a source, windows of ``seq_len + 1`` tokens come in a random order per epoch
(random start offset, then a permutation), from ``SeedSequence([seed, source, epoch, STREAM])``
alone; a source that runs out starts its next epoch. Rank ``r`` of ``world_size`` takes rows
``[r * B, (r + 1) * B)`` of every global batch; every rank advances every source identically, so
the global stream does not depend on the number of ranks and the state is a few integers.

:class:`DatasetsSplit` opens the ``data.datasets`` of a training config: verifies each dataset,
checks they share one tokenizer that fits the model, splits each by whole documents into
train/validation, and builds the batcher. It mirrors :class:`~paddle_semoe.data.corpus.CorpusSplit`
(``train``/``val``/``sha256``/``unigram_baseline``/``batcher``/``tokenizer_identity``), so the
trainer treats both alike.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .dataset import DatasetError, PreparedDataset, TokenView
from .loader import _check_tokens, _gather
from .subword import META_FILE, TextTokenizer

__all__ = ["BlendedBatcher", "ConcatView", "DatasetsSplit", "check_tokenizer_on_resume", "check_weights"]

logger = logging.getLogger(__name__)

_STREAM = 0xB1E2D
_STATE_FORMAT = "paddle_semoe.data.BlendedBatcher/1"


def check_weights(weights: Sequence[float], names: Sequence[str]) -> np.ndarray:
    """``float64[N]`` weights normalised to sum 1.

    Raises:
        DatasetError: a weight that is negative, not finite or not a number, or weights summing to 0.
    """
    out = []
    for w, name in zip(weights, names):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise DatasetError(f"data.datasets weight of {name} must be a finite number, got {w!r}")
        if w < 0:
            raise DatasetError(f"data.datasets weight of {name} is negative ({w}); weights must be >= 0")
        out.append(float(w))
    if not out or sum(out) <= 0:
        raise DatasetError(f"data.datasets weights sum to 0 ({out}); give at least one dataset a positive weight")
    arr = np.asarray(out, dtype=np.float64)
    return arr / arr.sum()


class ConcatView:
    """Several token arrays/views as one virtual 1-D token array (validation of a blend)."""

    ndim = 1

    def __init__(self, parts: Sequence[Any], fingerprint: str) -> None:
        self._parts = list(parts)
        self._starts = np.concatenate([[0], np.cumsum([int(p.size) for p in self._parts])]).astype(np.int64)
        self.fingerprint = fingerprint
        dtypes = {np.dtype(p.dtype) for p in self._parts}
        self.dtype = np.dtype(np.uint32) if len(dtypes) > 1 else dtypes.pop()

    @property
    def size(self) -> int:
        return int(self._starts[-1])

    def take(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        flat = index.reshape(-1)
        out = np.empty(flat.shape, dtype=np.int64)
        part = np.searchsorted(self._starts, flat, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            local = flat[sel] - self._starts[p]
            src = self._parts[int(p)]
            out[sel] = src.take(local) if isinstance(src, (TokenView, ConcatView)) else np.asarray(src)[local]
        return out.reshape(index.shape)

    def iter_chunks(self, chunk_tokens: int = 1 << 20, limit: Optional[int] = None):
        remaining = self.size if limit is None else limit
        for p in self._parts:
            if remaining <= 0:
                return
            for chunk in p.iter_chunks(chunk_tokens, remaining):
                remaining -= chunk.size
                yield chunk


class _Source:
    """One source's window stream: epochs of randomly ordered, non-overlapping windows."""

    def __init__(self, tokens: Any, seq_len: int, seed: int, index: int, name: str) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.index = index
        self.name = name
        self.epoch = 0
        self.pos = 0
        self._plan: Optional[Tuple[int, int, np.ndarray]] = None

    def windows_possible(self) -> int:
        return max(0, (int(self.tokens.size) - 1 - (self.seq_len - 1)) // self.seq_len)

    def plan(self, epoch: int) -> Tuple[int, np.ndarray]:
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.index, epoch, _STREAM])))
            offset = int(rng.integers(0, self.seq_len))
            count = max(0, (int(self.tokens.size) - 1 - offset) // self.seq_len)
            self._plan = (epoch, offset, rng.permutation(count))
        return self._plan[1], self._plan[2]

    def next_starts(self, n: int) -> np.ndarray:
        """The next ``n`` window starts, rolling over epochs."""
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            offset, order = self.plan(self.epoch)
            take = min(n - filled, order.size - self.pos)
            out[filled : filled + take] = offset + order[self.pos : self.pos + take] * self.seq_len
            filled += take
            self.pos += take
            if self.pos >= order.size:
                self.epoch += 1
                self.pos = 0
        return out


def _fingerprint(tokens: Any) -> str:
    fp = getattr(tokens, "fingerprint", None)
    if fp is not None:
        return str(fp)
    return hashlib.sha256(np.ascontiguousarray(tokens).data).hexdigest()


class BlendedBatcher:
    """Endless, deterministic, rank-sharded batches drawn from weighted token sources.

    Args:
        sources: 1-D token arrays or :class:`TokenView` s (not copied).
        weights: one non-negative weight per source (normalised; must not sum to 0).
        global_batch_size: sequences per step summed over ranks.
        seq_len: tokens per input row; rows hold ``seq_len + 1`` tokens.
        seed, rank, world_size: stream selection and data-parallel position.
        names: source names for messages (default ``source0``, ...).

    Iterating yields ``int64[global_batch_size // world_size, seq_len + 1]``.

    Raises:
        DatasetError: bad weights, or a source with weight > 0 too short for one window.
        ValueError: bad sizes, rank or world size.
    """

    def __init__(
        self,
        sources: Sequence[Any],
        weights: Sequence[float],
        global_batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        names: Optional[Sequence[str]] = None,
    ) -> None:
        names = list(names) if names is not None else [f"source{i}" for i in range(len(sources))]
        if len(sources) != len(weights) or len(names) != len(sources) or not sources:
            raise ValueError(f"need one weight and name per source: {len(sources)} sources, {len(weights)} weights")
        self.weights = check_weights(weights, names)
        for name, value in (("global_batch_size", global_batch_size), ("seq_len", seq_len), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by world_size={world_size}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.global_batch_size = int(global_batch_size)
        self.seq_len = int(seq_len)
        self.rank, self.world_size = int(rank), int(world_size)
        self.batch_size = self.global_batch_size // self.world_size
        self._seed = int(seed)
        self.names = names
        self._sources = [
            _Source(_check_tokens(t, f"source {n}"), self.seq_len, self._seed, i, n) for i, (t, n) in enumerate(zip(sources, names))
        ]
        for src, w in zip(self._sources, self.weights):
            if w > 0 and src.windows_possible() < 1:
                raise DatasetError(
                    f"{src.name} has {int(src.tokens.size)} training tokens, fewer than one window of {self.seq_len + 1} "
                    f"(lower data.seq_len or add text)"
                )
        self._fingerprints = [_fingerprint(s.tokens) for s in self._sources]
        self._drawn = np.zeros(len(self._sources), dtype=np.int64)
        self._n = 0

    # ----------------------------------------------------------------------------- iteration
    @property
    def step(self) -> int:
        """Global batches taken so far."""
        return self._n // self.global_batch_size

    @property
    def drawn(self) -> np.ndarray:
        """Sequences drawn from each source so far (over all ranks)."""
        return self._drawn.copy()

    def _assign(self, count: int) -> np.ndarray:
        """Source index of the next ``count`` global sequences (largest deficit first)."""
        out = np.empty(count, dtype=np.int64)
        drawn = self._drawn.astype(np.float64)
        for j in range(count):
            deficit = self.weights * (self._n + j + 1) - drawn
            i = int(np.argmax(deficit))
            out[j] = i
            drawn[i] += 1
        return out

    def __iter__(self) -> "BlendedBatcher":
        return self

    def __next__(self) -> np.ndarray:
        """The next ``int64[batch_size, seq_len + 1]`` batch of this rank."""
        g = self.global_batch_size
        which = self._assign(g)
        starts = np.empty(g, dtype=np.int64)
        for i, src in enumerate(self._sources):
            sel = which == i
            k = int(sel.sum())
            if k:
                starts[sel] = src.next_starts(k)
                self._drawn[i] += k
        self._n += g
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        out = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        mine = which[lo:hi]
        for i in np.unique(mine):
            sel = mine == i
            out[sel] = _gather(self._sources[int(i)].tokens, starts[lo:hi][sel], self.seq_len)
        self.last_sources = mine
        return out

    # ------------------------------------------------------------------------------- resume
    def state_dict(self) -> Dict[str, Any]:
        """Position in the stream (plain JSON values); not the rank or world size."""
        return {
            "format": _STATE_FORMAT,
            "seed": self._seed,
            "sequences": self._n,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "weights": [float(w) for w in self.weights],
            "sources": [
                {"name": s.name, "fingerprint": fp, "num_tokens": int(s.tokens.size), "epoch": s.epoch, "pos": s.pos, "drawn": int(d)}
                for s, fp, d in zip(self._sources, self._fingerprints, self._drawn)
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the run that produced ``state`` stopped.

        Raises ``ValueError`` naming what differs (format, window length, global batch size,
        weights, number of datasets, or a dataset's tokens).
        """
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"cannot resume data loader: the checkpoint's data state has format {state.get('format')!r}, "
                f"expected {_STATE_FORMAT!r} (it was trained on other data: built-in corpus vs data.datasets?)"
            )
        for key, mine in (("seq_len", self.seq_len), ("global_batch_size", self.global_batch_size)):
            if state.get(key) != mine:
                raise ValueError(f"cannot resume data loader: {key} is {state.get(key)!r} in the checkpoint but {mine!r} here")
        sources = state.get("sources")
        if not isinstance(sources, list) or len(sources) != len(self._sources):
            got = len(sources) if isinstance(sources, list) else None
            raise ValueError(f"cannot resume data loader: the checkpoint blends {got} datasets, this job {len(self._sources)}")
        if not np.allclose(np.asarray(state.get("weights"), dtype=np.float64), self.weights, rtol=0, atol=1e-12):
            raise ValueError(f"cannot resume data loader: weights {state.get('weights')} in the checkpoint, {self.weights.tolist()} here")
        for src, fp, saved in zip(self._sources, self._fingerprints, sources):
            if saved.get("fingerprint") != fp or saved.get("num_tokens") != int(src.tokens.size):
                raise ValueError(
                    f"cannot resume data loader: dataset {src.name} differs from the checkpoint's {saved.get('name')} "
                    f"(tokens or train/validation split changed)"
                )
        values = [state.get("seed"), state.get("sequences")] + [v for s in sources for v in (s.get("epoch"), s.get("pos"), s.get("drawn"))]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise ValueError("cannot resume data loader: bad counters in the checkpoint's data state")
        self._seed = int(state["seed"])
        self._n = int(state["sequences"])
        self._drawn = np.array([s["drawn"] for s in sources], dtype=np.int64)
        for src, saved in zip(self._sources, sources):
            src.seed = self._seed
            src.epoch, src.pos, src._plan = int(saved["epoch"]), int(saved["pos"]), None
            _, order = src.plan(src.epoch)
            if src.pos > order.size:
                raise ValueError(f"cannot resume data loader: position {src.pos} is beyond epoch {src.epoch} of {src.name}")


def _sample_unigram(train: Any, val: Any, vocab_size: int, limit: int) -> float:
    """Held-out unigram cross-entropy on bounded samples (file reads, bounded memory): the
    formula of :func:`~paddle_semoe.data.tokenizer.unigram_cross_entropy_nats` (Laplace
    smoothing 1) on token histograms."""
    def counts(view: Any) -> np.ndarray:
        total = np.zeros(vocab_size, dtype=np.int64)
        for chunk in view.iter_chunks(1 << 20, limit):
            total += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
        return total

    tc, vc = counts(train), counts(val)
    log_p = np.log(tc + 1.0) - math.log(tc.sum() + vocab_size)
    return float(-(vc * log_p).sum() / max(vc.sum(), 1))


class DatasetsSplit:
    """The ``data.datasets`` of a job, opened, verified and split (see the module docs).

    Args:
        specs: ``(path, weight)`` per dataset.
        val_fraction: fraction of each dataset's documents held out for validation.
        model_vocab_size: the model's ``vocab_size``; the tokenizer must fit in it.
        verify: ``"full"`` (SHA-256 of every file) or ``"size"``.

    Raises:
        DatasetError: a missing/altered dataset, bad weights, datasets with different
            tokenizers, or a tokenizer larger than the model's vocabulary (each one line).
    """

    def __init__(self, specs: Sequence[Tuple[str, float]], val_fraction: float, model_vocab_size: int, verify: str = "full") -> None:
        if not specs:
            raise DatasetError("data.datasets is empty")
        names = [str(p) for p, _ in specs]
        self.weights = check_weights([w for _, w in specs], names)
        self.datasets = [PreparedDataset(Path(p), verify=verify) for p, _ in specs]
        first = self.datasets[0]
        for ds in self.datasets[1:]:
            if ds.tokenizer_record["sha256"] != first.tokenizer_record["sha256"]:
                raise DatasetError(
                    f"data.datasets use different tokenizers: {first.path} has {first.tokenizer_record['name']!r} "
                    f"(sha256 {first.tokenizer_record['sha256'][:12]}), {ds.path} has {ds.tokenizer_record['name']!r} "
                    f"(sha256 {ds.tokenizer_record['sha256'][:12]}); prepare them with one tokenizer"
                )
        self.tokenizer_record = first.tokenizer_record
        if first.vocab_size > model_vocab_size:
            raise DatasetError(
                f"tokenizer {self.tokenizer_record['name']!r} of {first.path} has {first.vocab_size} tokens, more than "
                f"model.vocab_size={model_vocab_size}; set model.vocab_size >= {first.vocab_size}"
            )
        splits = [ds.split(val_fraction) for ds in self.datasets]
        self.trains: List[TokenView] = [t for t, _ in splits]
        self.names = names
        self.sha256 = hashlib.sha256(
            repr(([ds.fingerprint for ds in self.datasets], self.weights.tolist(), float(val_fraction))).encode()
        ).hexdigest()
        self.name = "+".join(names)
        self.val = ConcatView([v for _, v in splits], hashlib.sha256(f"{self.sha256}:val".encode()).hexdigest())
        self.train = self.trains[0] if len(self.trains) == 1 else ConcatView(self.trains, f"{self.sha256}:train")
        for ds, (t, v) in zip(self.datasets, splits):
            logger.info("dataset %s: %d train tokens, %d val tokens (%s)", ds.path, t.size, v.size, ds)

    @property
    def tokenizer_dir(self) -> Path:
        """The directory of the (shared) tokenizer: model file + ``tokenizer_meta.json``."""
        return self.datasets[0].tokenizer_dir

    def tokenizer_files(self) -> List[Tuple[str, Path]]:
        """``(name inside a checkpoint/package, source path)`` of the tokenizer's files."""
        d = self.tokenizer_dir
        return [(f"tokenizer/{self.tokenizer_record['file']}", d / self.tokenizer_record["file"]), (f"tokenizer/{META_FILE}", d / META_FILE)]

    def tokenizer_identity(self) -> Dict[str, Any]:
        return {"name": self.tokenizer_record["name"], "sha256": self.tokenizer_record["sha256"], "kind": self.tokenizer_record["kind"]}

    def load_tokenizer(self) -> TextTokenizer:
        return self.datasets[0].load_tokenizer()

    def unigram_baseline(self, vocab_size: int, sample_tokens: int = 8 << 20) -> float:
        """Held-out unigram cross-entropy (nats/token), estimated on up to ``sample_tokens``."""
        return _sample_unigram(self.train, self.val, vocab_size, sample_tokens)

    def batcher(self, global_batch_size: int, seq_len: int, *, seed: int, rank: int, world_size: int) -> BlendedBatcher:
        return BlendedBatcher(
            self.trains, self.weights.tolist(), global_batch_size, seq_len, seed=seed, rank=rank, world_size=world_size, names=self.names
        )


def check_tokenizer_on_resume(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any], checkpoint: str) -> None:
    """Refuse resuming a checkpoint trained with another tokenizer, naming both.

    ``saved`` is the checkpoint's tokenizer identity (``None`` for checkpoints from before
    tokenizers were recorded: the byte tokenizer).
    """
    saved_name = saved.get("name") if saved else "byte"
    saved_sha = saved.get("sha256") if saved else None
    if saved is None and current.get("kind") == "byte":
        return
    if saved_sha != current.get("sha256"):
        raise ValueError(
            f"checkpoint {checkpoint} was trained with tokenizer {saved_name!r}"
            + (f" (sha256 {str(saved_sha)[:12]})" if saved_sha else "")
            + f", but this job's data uses tokenizer {current.get('name')!r} (sha256 {str(current.get('sha256'))[:12]}); "
            "resume on data prepared with the checkpoint's tokenizer (tools/prepare_data.py --tokenizer <checkpoint>/tokenizer)"
        )

