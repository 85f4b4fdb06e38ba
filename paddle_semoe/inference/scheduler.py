"""Continuous batching: many sequences decoded together, joining and leaving as they finish.

Each sequence keeps its own key/value caches (one :class:`~paddle_semoe.models.gpt.KVCache`
``[1, H, S_seq, Dh]`` per block) and position, so sequences of different lengths need no
padding or masks. A decode step runs, per block, the training ``Block``'s own pieces:
``attend_many`` (projections once over the batch, attention per sequence), then ``ln2`` and the
FFN once over all the step's tokens (for an MoE block: one routing, one set of expert loads).
A new sequence is prefilled alone, then joins the next decode step; a finished one leaves.

:class:`BatchScheduler` is the synchronous core (``add``, ``step``); :class:`GenerationEngine`
runs it on one thread for concurrent clients (``submit`` from any thread, tokens delivered to
per-request sinks, ``cancel``, and a ``shutdown`` that finishes the requests in flight).
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import paddle

from paddle_semoe.inference.runner import InferenceModel, _pick
from paddle_semoe.models.gpt import KVCache
from paddle_semoe.moe import MoELayer

logger = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """What serving needs from a tokenizer (the byte tokenizer, a package's BPE tokenizer)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens.

    Attributes:
        max_new_tokens: tokens to generate at most (>= 1).
        temperature: 0 means greedy; else softmax temperature.
        top_k: sample among the k most likely tokens (0: all).
        seed: the sequence's own random stream.
        stop_ids: token ids that end the sequence (not emitted).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Sequence:
    """One generation request inside the scheduler."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[["Sequence", int | None], None] | None = None  # token, or None when finished
    id: int = 0
    generated: list[int] = field(default_factory=list)
    caches: list[KVCache] | None = None
    finish_reason: str | None = None  # "length" | "stop" | "cancelled" | "error"
    error: BaseException | None = None
    cancelled: bool = False
    rng: np.random.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cache_len(self) -> int:
        return 0 if not self.caches else int(self.caches[0].k.shape[2])


def pick_token(logits_V: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy (temperature 0) or temperature/top-k sampling from float logits [V]."""
    top_k = params.top_k if params.top_k < logits_V.shape[0] else 0
    z = logits_V[None].astype(np.float64)
    return int(_pick(z, params.temperature == 0.0, params.temperature, top_k, rng)[0])


class BatchScheduler:
    """Synchronous continuous batching over one :class:`InferenceModel`.

    Args:
        model: the served model (any expert mode).
        max_batch: sequences decoded together at most; further ones wait.
    """

    def __init__(self, model: InferenceModel, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = int(model.model.config.max_seq_len)
        self.waiting: list[Sequence] = []
        self.active: list[Sequence] = []
        self._ids = itertools.count(1)

    def check_prompt(self, prompt: list[int]) -> None:
        """Raise ValueError unless ``prompt`` is non-empty and leaves room below max_seq_len."""
        if not prompt:
            raise ValueError("prompt is empty: a sequence needs at least one token")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room below "
                             f"max_seq_len={self.max_seq_len}")

    def add(self, seq: Sequence) -> Sequence:
        self.check_prompt(seq.prompt)
        seq.id = seq.id or next(self._ids)
        seq.rng = np.random.default_rng(seq.params.seed)
        self.waiting.append(seq)
        return seq

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    # -- one step ---------------------------------------------------------------------
    def step(self) -> None:
        """Drop cancelled sequences, admit waiting ones (prefill), then one decode step."""
        for s in [s for s in self.active + self.waiting if s.cancelled and not s.done]:
            self._finish(s, "cancelled")
        self.waiting = [s for s in self.waiting if not s.done]
        self.active = [s for s in self.active if not s.done]
        while self.waiting and len(self.active) < self.max_batch:
            seq = self.waiting.pop(0)
            self._prefill(seq)
            if not seq.done:
                self.active.append(seq)
        if self.active:  # none is done: finished ones were dropped or never added
            self._decode(self.active)
        self.active = [s for s in self.active if not s.done]

    def run(self) -> None:
        """Step until every added sequence finished."""
        while not self.idle:
            self.step()

    @paddle.no_grad()
    def _prefill(self, seq: Sequence) -> None:
        logits, caches = self.model.forward(paddle.to_tensor(np.asarray([seq.prompt], dtype=np.int64)))
        seq.caches = caches
        self._emit(seq, logits[0, -1].numpy())

    @paddle.no_grad()
    def _decode(self, seqs: list[Sequence]) -> None:
        """One token for each of ``seqs``: batched projections, FFN and experts; attention per cache."""
        m = self.model.model
        x = paddle.concat(
            [m.embed(paddle.to_tensor([[s.generated[-1]]], dtype="int64"), s.cache_len) for s in seqs], axis=0
        )  # [B, 1, D]
        caches = [s.caches for s in seqs if s.caches is not None]  # per sequence, per block
        assert len(caches) == len(seqs)  # every one set by its prefill
        for i, block in enumerate(m.blocks):
            x, new_caches = block.attend_many(x, [c[i] for c in caches])
            for c, kv in zip(caches, new_caches):
                c[i] = kv
            out = block.ffn(block.ln2(x))
            x = x + (out.y if isinstance(block.ffn, MoELayer) else out)
        logits = m.head(x)[:, -1, :].numpy()
        for b, s in enumerate(seqs):
            self._emit(s, logits[b])

    def _emit(self, seq: Sequence, logits_V: np.ndarray) -> None:
        assert seq.rng is not None
        tok = pick_token(logits_V, seq.params, seq.rng)
        if tok in seq.params.stop_ids:
            self._finish(seq, "stop")
            return
        seq.generated.append(tok)
        if seq.sink is not None:
            seq.sink(seq, tok)
        if len(seq.generated) >= seq.params.max_new_tokens or len(seq.prompt) + len(seq.generated) >= self.max_seq_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        if seq.done:
            return
        seq.finish_reason = reason
        seq.error = error
        seq.caches = None
        if seq.sink is not None:
            seq.sink(seq, None)

    def fail_all(self, error: BaseException) -> None:
        for s in self.active + self.waiting:
            self._finish(s, "error", error)
        self.active, self.waiting = [], []


def generate_batch(model: InferenceModel, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                   max_batch: int = 8) -> list[Sequence]:
    """Generate for every prompt with continuous batching; returns the finished sequences."""
    sched = BatchScheduler(model, max_batch)
    plist = params if isinstance(params, list) else [params] * len(prompts)
    seqs = [sched.add(Sequence(list(p), sp)) for p, sp in zip(prompts, plist)]
    sched.run()
    return seqs


class GenerationEngine:
    """One thread running a :class:`BatchScheduler` for concurrent callers.

    ``submit`` returns the :class:`Sequence`; its ``sink`` is called on the engine thread with
    each token and finally with None. ``shutdown(drain=True)`` stops admitting new requests and
    returns once every request in flight finished.
    """

    def __init__(self, model: InferenceModel, max_batch: int = 8):
        self.scheduler = BatchScheduler(model, max_batch)
        self._cv = threading.Condition()
        self._incoming: list[Sequence] = []
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="generation-engine", daemon=True)

    def start(self) -> "GenerationEngine":
        self._thread.start()
        return self

    @property
    def accepting(self) -> bool:
        return self._accepting

    def in_flight(self) -> int:
        with self._cv:
            return len(self._incoming) + len(self.scheduler.active) + len(self.scheduler.waiting)

    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Sequence, int | None], None]) -> Sequence:
        seq = Sequence(list(prompt), params, sink)
        with self._cv:
            if not self._accepting:
                raise RuntimeError("the engine is shutting down")
            self.scheduler.check_prompt(seq.prompt)
            self._incoming.append(seq)
            self._cv.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True  # dropped at the next step, on the engine thread

    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            with self._cv:
                while not self._incoming and sched.idle and not self._stop:
                    self._cv.wait()
                if self._stop and not self._incoming and sched.idle:
                    return
                for s in self._incoming:
                    sched.add(s)
                self._incoming.clear()
            try:
                sched.step()
            except Exception as exc:  # a failed step fails its requests, the engine keeps serving
                logger.exception("generation step failed")
                sched.fail_all(exc)
            with self._cv:
                self._cv.notify_all()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with ``drain`` wait for the requests in flight, else cancel them."""
        with self._cv:
            self._accepting = False
            if not drain:
                for s in self._incoming + self.scheduler.active + self.scheduler.waiting:
                    s.cancelled = True
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)
