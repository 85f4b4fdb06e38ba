"""Expert-granular serving: per-expert sections, the hot-expert cache, pre-gating, Belady."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddle_semoe.inference.cache import (
    DiskExpertReader,
    ExpertCache,
    ExpertGeometry,
    belady_hit_rate,
    routing_requests,
    slots_for_expert_budget,
)
from paddle_semoe.inference.export import export_package
from paddle_semoe.inference.package import FORMAT, FORMAT_V1, PackageError, aligned_buffer, read_manifest
from paddle_semoe.inference.runner import InferenceModel, ServeConfig
from paddle_semoe.models.gpt import GPTConfig, GPTMoE, MoESettings

E = 8


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    paddle.seed(5)
    cfg = GPTConfig(d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=48, moe_every=1,
                    moe=MoESettings(num_experts=E, top_k=2))
    model = GPTMoE(cfg)
    for p in model.parameters():  # sharper routing than the init gives
        p.set_value(p * 8.0 if len(p.shape) >= 2 else p)
    return export_package(model, tmp_path_factory.mktemp("pkg") / "pkg", graphs=False)


def _prompts(B=3, P=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (B, P)).astype(np.int64)


def _run(man, serve, new=10):
    m = InferenceModel.load(man, serve)
    try:
        res = m.generate(_prompts(), new)
        logits, _ = m.forward(paddle.to_tensor(_prompts(2, 9, seed=1)))
        return res.tokens, logits.numpy(), m
    finally:
        m.close()


def test_each_expert_reads_back_its_own_rows_with_checksums(package):
    man = read_manifest(package)
    s = man.sections[1]
    assert len(s.expert_crc32) == E
    w1 = np.fromfile(package / s.file, np.uint8)
    full = {t.name: w1[t.offset:t.offset + t.nbytes].view(np.float32).reshape(t.shape) for t in s.tensors}
    geo = ExpertGeometry.of(man)
    assert geo.matrix_bytes % 4096 == 0  # D*F*4 = 8192: every expert range is 4096-aligned
    reader = DiskExpertReader(man, direct=True, verify=True)
    a, b = aligned_buffer(geo.matrix_bytes), aligned_buffer(geo.matrix_bytes)
    for e in (0, 5, E - 1):
        assert reader.read(1, e, a, b) == 2 * geo.matrix_bytes
        np.testing.assert_array_equal(a.view(np.float32).reshape(32, 64), full["w1"][e])
        np.testing.assert_array_equal(b.view(np.float32).reshape(64, 32), full["w2"][e])
    reader.close()


@pytest.mark.parametrize("slots,prefetch,source", [(E * 4, False, "host"), (6, True, "disk"), (2, True, "disk"), (1, False, "disk")])
def test_cache_equals_resident_bit_for_bit(package, slots, prefetch, source):
    man = read_manifest(package)
    ref_tokens, ref_logits, _ = _run(man, ServeConfig(mode="resident", source="host"))
    tokens, logits, m = _run(man, ServeConfig(mode="cache", num_slots=slots, source=source, prefetch=prefetch,
                                              verify_reads=True))
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(logits, ref_logits)
    cs = m.experts.cache_stats
    assert cs.accesses == cs.hits + cs.misses > 0
    assert m.experts.resident_expert_bytes() < man.expert_bytes or slots >= E * 4
    if prefetch:
        assert cs.predicted > 0 and 0.0 <= cs.prediction_precision <= 1.0


def test_cache_loads_only_routed_experts_and_keeps_hot_ones(package):
    man = read_manifest(package)
    geo = ExpertGeometry.of(man)
    m = InferenceModel.load(man, ServeConfig(mode="cache", num_slots=geo.layers * E, source="disk", prefetch=False,
                                             record_routing=True))
    x = paddle.to_tensor(_prompts(1, 1))
    m.forward(x)
    used = sum(len(ids) for _, ids in m.experts.routing)
    assert used <= geo.layers * 2  # one token, top-2: at most two experts per layer
    assert m.experts.stats.loads == used
    assert m.experts.stats.bytes_loaded == used * geo.streamed_bytes
    m.forward(x)  # the same token again: every expert it needs is resident
    cs = m.experts.cache_stats
    assert cs.hits == used and cs.misses == used and m.experts.stats.loads == used
    m.close()


def test_prefetch_predicts_with_the_next_router(package):
    man = read_manifest(package)
    m = InferenceModel.load(man, ServeConfig(mode="cache", num_slots=16, source="host", prefetch=True))
    m.generate(_prompts(1, 5), 6)
    cs = m.experts.cache_stats
    m.close()
    assert cs.prefetch_loads > 0 and cs.predicted > 0
    # predictions are scored against what the next layer actually used
    assert 0 < cs.predicted_used <= min(cs.predicted, cs.used_after_prediction)


def test_belady_on_hand_traces():
    # classic sequence, capacity 3: MIN gives 5 hits of 12 (7 misses)
    seq = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]
    assert belady_hit_rate([[k] for k in seq], 3) == pytest.approx(5 / 12)
    # grouped requests: both keys of a request stay together
    assert belady_hit_rate([[1, 2], [3], [1, 2]], 3) == pytest.approx(2 / 5)
    assert belady_hit_rate([[1, 2], [3, 4], [1, 2]], 2) == 0.0
    assert belady_hit_rate([], 2) == 0.0
    with pytest.raises(ValueError, match="more than capacity"):
        belady_hit_rate([[1, 2, 3]], 2)


def test_belady_bounds_the_live_cache(package):
    man = read_manifest(package)
    m = InferenceModel.load(man, ServeConfig(mode="cache", num_slots=6, source="host", prefetch=False,
                                             record_routing=True))
    m.generate(_prompts(2, 4), 12)
    cs, routing = m.experts.cache_stats, m.experts.routing
    m.close()
    reqs = routing_requests(routing, E)
    assert sum(len(r) for r in reqs) == cs.accesses
    opt = belady_hit_rate(reqs, 6)
    assert cs.hit_rate <= opt + 1e-12  # no demand-paging policy beats the offline optimum
    assert opt > 0


def test_budget_to_slots(package):
    man = read_manifest(package)
    geo = ExpertGeometry.of(man)
    bias = geo.layers * E * (32 + 64) * 4
    assert slots_for_expert_budget(man, bias + 3 * geo.slot_bytes) == 3
    with pytest.raises(ValueError, match="holds no expert slot"):
        slots_for_expert_budget(man, bias)
    m = InferenceModel.load(man, ServeConfig(mode="cache", budget_bytes=bias + 5 * geo.slot_bytes + 17, source="host"))
    assert m.experts.num_slots == 5 and m.experts.resident_expert_bytes() <= bias + 5 * geo.slot_bytes
    m.close()


def test_format_1_packages_still_serve_and_unknown_formats_are_refused(package, tmp_path):
    v1 = tmp_path / "v1"
    shutil.copytree(package, v1)
    doc = json.loads((v1 / "manifest.json").read_text())
    assert doc["format"] == FORMAT
    doc["format"] = FORMAT_V1
    for s in doc["sections"]:
        del s["expert_crc32"]
    (v1 / "manifest.json").write_text(json.dumps(doc))
    man1 = read_manifest(v1)
    assert man1.sections[0].expert_crc32 == read_manifest(package).sections[0].expert_crc32  # derived on load
    tokens, _, _ = _run(man1, ServeConfig(mode="cache", num_slots=4, source="disk", verify_reads=True), new=4)
    ref, _, _ = _run(read_manifest(package), ServeConfig(mode="resident", source="host"), new=4)
    np.testing.assert_array_equal(tokens, ref)
    doc["format"] = "paddle-semoe-inference/99"
    (v1 / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(PackageError, match="format 'paddle-semoe-inference/99'"):
        read_manifest(v1)


def test_a_corrupt_expert_fails_its_checksum_naming_file_and_expert(package, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(package, bad)
    man = read_manifest(bad)
    sec = man.sections[2]
    off, n = sec.expert_range("w2", 3)
    # corrupt after verification, keeping size and mtime (stamp) so only the CRC can catch it
    path = bad / sec.file
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[off + 10] ^= 0x40
    path.write_bytes(bytes(data))
    import os

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    geo = ExpertGeometry.of(man)
    reader = DiskExpertReader(man, direct=True, verify=True)
    a, b = aligned_buffer(geo.matrix_bytes), aligned_buffer(geo.matrix_bytes)
    reader.read(2, 2, a, b)  # a neighbour is fine
    with pytest.raises(PackageError, match=r"layer_02\.bin: expert 3 fails its CRC-32"):
        reader.read(2, 3, a, b)
    reader.close()


@pytest.fixture(scope="module")
def package8(tmp_path_factory) -> Path:
    paddle.seed(5)
    cfg = GPTConfig(d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=48, moe_every=1,
                    moe=MoESettings(num_experts=E, top_k=2))
    model = GPTMoE(cfg)
    for p in model.parameters():
        p.set_value(p * 8.0 if len(p.shape) >= 2 else p)
    return export_package(model, tmp_path_factory.mktemp("pkg8") / "pkg", graphs=False, int8=True)


def test_int8_sections_load_as_stored_with_per_output_channel_scales(package8):
    from paddle_semoe.inference.package import quantize_int8

    man = read_manifest(package8)
    assert len(man.int8_sections) == len(man.sections)
    s, s8 = man.sections[0], man.int8_sections[0]
    assert s8.nbytes < s.nbytes / 3  # int8 weights: a quarter of the float32 bytes, plus scales
    raw = np.fromfile(package8 / s.file, np.uint8)
    w1 = raw[s.tensor("w1").offset:].view(np.float32)[: 8 * 32 * 64].reshape(8, 32, 64)
    q, scale = quantize_int8(w1)
    assert scale.shape == (8, 64) and q.dtype == np.int8
    assert np.all(np.abs(q.astype(np.float32) * scale[:, None, :] - w1) <= scale[:, None, :] / 2 + 1e-6)
    geo = ExpertGeometry.of(man)
    assert geo.weight_bytes("int8") * 4 == geo.weight_bytes("float32") == geo.matrix_bytes
    for verify_direct in (True, False):
        reader = DiskExpertReader(man, direct=verify_direct, verify=True, quant="int8")
        a, b = aligned_buffer(geo.weight_bytes("int8")), aligned_buffer(geo.weight_bytes("int8"))
        assert reader.read(0, 6, a, b) == 2 * 32 * 64  # bytes read: int8, straight into the slot
        np.testing.assert_array_equal(a.view(np.int8).reshape(32, 64), q[6])
        np.testing.assert_array_equal(reader.scale1[0, 6], scale[6])
        with pytest.raises(ValueError, match="needs 2048 B"):
            reader.read(0, 6, a[:100], b)
        reader.close()


def test_int8_slots_hold_four_times_the_experts(package8):
    """An int8 slot is a quarter of a float32 slot's weight bytes: the same budget holds ~4x the
    experts, and the cache keeps within the budget."""
    man = read_manifest(package8)
    geo = ExpertGeometry.of(man)
    tables = geo.layers * geo.experts * (geo.d_model + geo.d_ff) * 4
    budget = tables * 2 + 4 * geo.slot_bytes
    assert slots_for_expert_budget(man, budget) == (budget - tables) // geo.slot_bytes == 4  # float32: bias table resident
    s8 = slots_for_expert_budget(man, budget, "int8")
    assert s8 == (budget - 2 * tables) // (2 * 32 * 64 + 2 * (32 + 64) * 4) == 13
    m = InferenceModel.load(man, ServeConfig(mode="cache", budget_bytes=budget, source="host", quant="int8"))
    try:
        assert m.experts.num_slots == s8 and m.experts.w1.dtype == np.int8
        assert m.experts.resident_expert_bytes() <= budget
    finally:
        m.close()


def test_int8_serving_stays_close_to_float32(package8):
    man = read_manifest(package8)
    ref_tokens, ref_logits, _ = _run(man, ServeConfig(mode="resident", source="host"))
    tokens, logits, m = _run(man, ServeConfig(mode="cache", num_slots=6, source="disk", quant="int8", verify_reads=True))
    rel = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
    assert 0 < rel < 0.05, rel  # int8 changes the logits, by little
    agree = (tokens == ref_tokens).mean()
    assert agree > 0.5, agree
    assert m.experts.stats.bytes_loaded % (2 * 32 * 64) == 0  # every load read int8 bytes


def test_int8_slots_serve_the_dequantized_model(tmp_path):
    """On a model whose expert weights are already int8-representable (``q * scale``), int8
    serving (int8 slots, the int8 FFN) and float32 all-resident serving are the same model: the
    only difference left is float32 rounding, so the tokens agree and the logits nearly so."""
    from paddle_semoe.inference.package import quantize_int8

    paddle.seed(11)
    cfg = GPTConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=48, moe_every=1,
                    moe=MoESettings(num_experts=E, top_k=2))
    model = GPTMoE(cfg)
    for layer in model.moe_layers():
        for name in ("w1", "w2"):
            p = getattr(layer.experts, name)
            q, scale = quantize_int8(p.numpy() * 8.0)
            p.set_value(q * scale[:, None, :])
    man = read_manifest(export_package(model, tmp_path / "pkg", graphs=False, int8=True))
    ref_tokens, ref_logits, _ = _run(man, ServeConfig(mode="resident", source="host"))
    tokens, logits, m = _run(man, ServeConfig(mode="cache", num_slots=5, source="disk", quant="int8"))
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert np.abs(logits - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
    assert m.experts.w1.dtype == np.int8 and m.experts.stats.loads > 0


def test_int4_slots_serve_the_dequantized_model(tmp_path):
    """int4 sections (two values per byte, a scale per output channel and group of 32 input rows):
    on int4-representable weights, int4 serving == float32 all-resident serving up to float32
    rounding; a load reads an eighth of float32's weight bytes; a budget holds more slots."""
    from paddle_semoe.inference.package import dequantize_int4, quantize_int4

    paddle.seed(12)
    cfg = GPTConfig(d_model=64, n_layers=2, n_heads=4, d_ff=64, max_seq_len=48, moe_every=1,
                    moe=MoESettings(num_experts=E, top_k=2))
    model = GPTMoE(cfg)
    for layer in model.moe_layers():
        for name in ("w1", "w2"):
            p = getattr(layer.experts, name)
            p.set_value(dequantize_int4(*quantize_int4(p.numpy() * 8.0)))
    man = read_manifest(export_package(model, tmp_path / "pkg", graphs=False, int4=True))
    assert len(man.int4_sections) == 2 and not man.int8_sections
    ref_tokens, ref_logits, _ = _run(man, ServeConfig(mode="resident", source="host"))
    tokens, logits, m = _run(man, ServeConfig(mode="cache", num_slots=5, source="disk", quant="int4", verify_reads=True))
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert np.abs(logits - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()
    geo = ExpertGeometry.of(man)
    assert m.experts.w1.dtype == np.uint8 and m.experts.w1.shape == (5, 64, 32)
    assert m.experts.stats.bytes_loaded == m.experts.stats.loads * geo.streamed_bytes // 8
    # slot: 2 x 2048 B packed weights + 512 B biases + 1024 B scales (2 groups x 128 channels);
    # resident: biases and scales of all 16 experts
    assert geo.quant_slot_bytes("int4") == 5632 and geo.scale_bytes("int4") == 1024
    budget = 16 * 512 + 2 * geo.slot_bytes
    assert slots_for_expert_budget(man, budget) == 2
    assert slots_for_expert_budget(man, budget, "int4") == (budget - 16 * (512 + 1024)) // 5632 == 8


def test_int8_needs_cache_mode_and_int8_sections(package):
    with pytest.raises(ValueError, match="served by mode 'cache' only"):
        ServeConfig(mode="ring", num_slots=1, quant="int8")
    with pytest.raises(PackageError, match="no int8 expert sections"):
        InferenceModel.load(read_manifest(package), ServeConfig(mode="cache", num_slots=2, quant="int8"))


def test_no_slot_is_computed_on_before_its_load_or_reloaded_in_use(package):
    """Several loader threads, few slots (constant eviction), prefetch on: replay the trace."""
    man = read_manifest(package)
    serve = ServeConfig(mode="cache", num_slots=3, source="disk", loader_threads=3, prefetch=True)
    m = InferenceModel.load(man, serve, trace=True)
    try:
        m.generate(_prompts(2, 5), 8)
    finally:
        m.close()
    state: dict[int, tuple[str, int]] = {}
    computed = 0
    for kind, key, slot, _t in m.experts.trace:  # appended under one lock: a total order
        st, held = state.get(slot, ("empty", -1))
        if kind == "load_start":
            assert st in ("empty", "ready"), f"slot {slot} reloaded while {st} (key {held})"
            state[slot] = ("loading", key)
        elif kind == "load_end":
            assert (st, held) == ("loading", key)
            state[slot] = ("ready", key)
        elif kind == "compute_start":
            assert (st, held) == ("ready", key), f"key {key} computed on slot {slot} in state {st} of key {held}"
            state[slot] = ("busy", key)
            computed += 1
        elif kind == "compute_end":
            assert (st, held) == ("busy", key)
            state[slot] = ("ready", key)
    assert computed == m.experts.cache_stats.accesses > 0


def test_mode_specs():
    from paddle_semoe.inference.runner import parse_mode

    assert parse_mode("resident") == ("resident", None)
    assert parse_mode("ring:2") == ("ring", 2)
    assert parse_mode(" cache:64 ") == ("cache", 64)
    assert parse_mode("cache") == ("cache", None)
    for bad, msg in (("rung:2", "unknown serving mode"), ("naive:3", "takes no slot count"),
                     ("cache:x", "must be an integer"), ("ring:0", "must be >= 1")):
        with pytest.raises(ValueError, match=msg):
            parse_mode(bad)


def test_quality_comparison(package8):
    from paddle_semoe.inference.quality import compare_serving

    man = read_manifest(package8)
    held = np.random.default_rng(9).integers(0, 256, 400)
    kw = dict(seq_len=20, windows=3, prompts=_prompts(2, 4), new_tokens=6)
    same = compare_serving(man, ServeConfig(mode="resident", source="host"),
                           ServeConfig(mode="cache", num_slots=5, source="host"), held, **kw)
    assert same.loss_delta == 0.0 and same.token_agreement == 1.0 and same.max_abs_logit_diff == 0.0
    assert same.first_divergence == (-1, -1) and same.tokens_scored == 60
    assert 4.0 < same.loss_ref < 20.0  # a random-ish model on random tokens: around ln(256) and above
    q = compare_serving(man, ServeConfig(mode="resident", source="host"),
                        ServeConfig(mode="cache", num_slots=5, source="host", quant="int8"), held, **kw)
    assert q.max_abs_logit_diff > 0 and abs(q.loss_delta) < 0.05 * q.loss_ref
    with pytest.raises(ValueError, match="longer than seq_len"):
        compare_serving(man, ServeConfig(mode="resident"), ServeConfig(mode="resident"), held[:10], **kw)


def _best_hits(reqs, capacity, resident=frozenset(), i=0, memo=None):
    """Exhaustive optimum: max hits over every eviction choice (tiny traces only)."""
    memo = {} if memo is None else memo
    if i == len(reqs):
        return 0
    key = (resident, i)
    if key in memo:
        return memo[key]
    r = set(reqs[i])
    hits = len(r & resident)
    keep = resident | r
    best = -1
    if len(keep) <= capacity:
        options = [keep]
    else:
        import itertools

        others = sorted(resident - r)
        drop = len(keep) - capacity
        options = [keep - set(c) for c in itertools.combinations(others, drop)]
    for nxt in options:
        best = max(best, _best_hits(reqs, capacity, frozenset(nxt), i + 1, memo))
    memo[key] = hits + best
    return memo[key]


def test_belady_equals_exhaustive_optimum_on_random_traces():
    rng = np.random.default_rng(0)
    for trial in range(60):
        cap = int(rng.integers(1, 4))
        reqs = [sorted(set(rng.integers(0, 6, int(rng.integers(1, cap + 1))).tolist())) for _ in range(int(rng.integers(1, 10)))]
        total = sum(len(r) for r in reqs)
        assert belady_hit_rate(reqs, cap) * total == pytest.approx(_best_hits(reqs, cap)), (trial, reqs, cap)
