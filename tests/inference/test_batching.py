"""Continuous batching: joined/left sequences give each sequence's own generation."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_semoe.inference.export import export_package
from paddle_semoe.inference.package import read_manifest
from paddle_semoe.inference.runner import InferenceModel, ServeConfig
from paddle_semoe.inference.scheduler import (
    BatchScheduler,
    GenerationEngine,
    SamplingParams,
    Sequence,
    generate_batch,
    pick_token,
)
from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    paddle.seed(7)
    cfg = GPTConfig(d_model=32, n_layers=3, n_heads=4, d_ff=64, max_seq_len=40, moe_every=2,
                    moe=MoESettings(num_experts=8, top_k=2))
    model = GPTMoE(cfg)
    for p in model.parameters():
        p.set_value(p * 8.0 if len(p.shape) >= 2 else p)
    return export_package(model, tmp_path_factory.mktemp("pkg") / "pkg", graphs=False)


PROMPTS = [[5, 9, 200, 31], [7], [100, 101, 102, 103, 104, 105, 106, 107, 108], [42, 43], [250, 1, 2]]
NEW = [6, 3, 8, 1, 5]


def _alone(m: InferenceModel, prompt, new):
    """Reference: the runner's own cached greedy generation, one sequence at a time."""
    return m.generate(np.asarray([prompt], np.int64), new).tokens[0, len(prompt):].tolist()


@pytest.mark.parametrize("serve", [ServeConfig(mode="resident", source="host"),
                                   ServeConfig(mode="cache", num_slots=5, source="disk")], ids=["resident", "cache"])
def test_batched_generation_equals_one_at_a_time(package, serve):
    man = read_manifest(package)
    m = InferenceModel.load(man, serve)
    try:
        ref = [_alone(m, p, n) for p, n in zip(PROMPTS, NEW)]
        seqs = generate_batch(m, PROMPTS, [SamplingParams(max_new_tokens=n) for n in NEW], max_batch=3)
    finally:
        m.close()
    assert [s.generated for s in seqs] == ref
    assert all(s.finish_reason == "length" for s in seqs)


def test_sequences_join_and_leave_and_batch_logits_match(package):
    man = read_manifest(package)
    m = InferenceModel.load(man, ServeConfig(mode="resident", source="host"))
    sched = BatchScheduler(m, max_batch=4)
    sizes = []
    a = sched.add(Sequence([1, 2, 3], SamplingParams(max_new_tokens=2)))
    b = sched.add(Sequence([9, 8, 7, 6, 5], SamplingParams(max_new_tokens=6)))
    sched.step()  # prefill both, one decode step over both
    sizes.append(len(sched.active))
    c = sched.add(Sequence([77], SamplingParams(max_new_tokens=4)))  # joins mid-flight
    while not sched.idle:
        sched.step()
        sizes.append(len(sched.active))
    assert sizes[0] == 1  # a finished after 2 tokens and left
    assert max(sizes) == 2 and sizes[-1] == 0
    for s, n in ((a, 2), (b, 6), (c, 4)):
        assert s.generated == _alone(m, s.prompt, n)
    # one batched decode step: logits of each row match its sequence alone (per-token routing)
    sched2 = BatchScheduler(m, max_batch=4)
    rows = []
    for p in PROMPTS[:3]:
        sched2.add(Sequence(p, SamplingParams(max_new_tokens=3)))
    captured = {}
    head = m.model.head

    def spy(x):
        out = head(x)
        captured.setdefault(int(x.shape[0]), out.numpy())
        return out

    m.model.head = spy
    try:
        sched2.step()
    finally:
        m.model.head = head
    batched = captured[3][:, -1, :]
    for i, s in enumerate(sched2.active):
        full = s.prompt + s.generated[:1]
        alone, _ = m.forward(paddle.to_tensor(np.asarray([full], np.int64)))
        rows.append(alone.numpy()[0, -1])
    m.close()
    np.testing.assert_allclose(batched, np.stack(rows), rtol=1e-5, atol=1e-5)


def test_stop_ids_sampling_and_bad_params(package):
    man = read_manifest(package)
    m = InferenceModel.load(man, ServeConfig(mode="resident", source="host"))
    first = _alone(m, PROMPTS[2], 8)
    i = next(i for i in range(1, 8) if first[i] not in first[:i])  # a token that first appears at i
    (s,) = generate_batch(m, [PROMPTS[2]], SamplingParams(max_new_tokens=8, stop_ids=(first[i],)))
    assert s.generated == first[:i] and s.finish_reason == "stop"
    # sampling is reproducible per sequence seed, whatever the batch
    p = SamplingParams(max_new_tokens=5, temperature=0.9, top_k=20, seed=3)
    one = generate_batch(m, [PROMPTS[2]], p)[0].generated
    many = generate_batch(m, [PROMPTS[0], PROMPTS[2], PROMPTS[1]], [p, p, p])[1].generated
    assert one == many
    # the sequence runs up to max_seq_len and stops with "length"
    (long,) = generate_batch(m, [[1] * 37], SamplingParams(max_new_tokens=10))
    assert len(long.generated) == 3 and long.finish_reason == "length"
    m.close()
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        SamplingParams(max_new_tokens=0)
    rng = np.random.default_rng(0)
    assert pick_token(np.array([0.0, 3.0, 1.0]), SamplingParams(), rng) == 1
    assert pick_token(np.array([0.0, 3.0, 1.0]), SamplingParams(temperature=1.0, top_k=1), rng) == 1


def test_engine_serves_concurrent_submitters_and_drains_on_shutdown(package):
    man = read_manifest(package)
    m = InferenceModel.load(man, ServeConfig(mode="cache", num_slots=4, source="host"))
    engine = GenerationEngine(m, max_batch=4).start()
    results: dict[int, list[int]] = {}
    done = threading.Event()
    lock = threading.Lock()

    def sink(seq, tok):
        with lock:
            if tok is None:
                results[seq.id] = list(seq.generated)
                if len(results) == len(PROMPTS):
                    done.set()

    seqs = [engine.submit(p, SamplingParams(max_new_tokens=n), sink) for p, n in zip(PROMPTS, NEW)]
    engine.shutdown(drain=True, timeout=120)  # returns after the in-flight requests finished
    assert done.is_set()
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit([1], SamplingParams(), sink)
    ref = [_alone(m, p, n) for p, n in zip(PROMPTS, NEW)]
    m.close()
    assert [results[s.id] for s in seqs] == ref
