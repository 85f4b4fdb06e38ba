"""LayerWeights' routed path (slot permutation on host buffers, chunked fallback) and the
pre-gating hook's host router, checked against direct references."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddle_semoe.inference.ring import LayerWeights
from paddle_semoe.inference.runner import _host_router, _PreGate
from paddle_semoe.moe import MoEConfig, MoELayer


class _FakeSlots:
    """A routed provider whose slot s scales its rows by ``scale[s]`` and adds ``s``; expert e
    sits in slot ``slot_of[e]``. Records every request."""

    expert_granular = True

    def __init__(self, num_slots: int, slot_of: np.ndarray):
        self.num_slots = num_slots
        self.slot_of = slot_of
        self.scale = np.arange(1, num_slots + 1, dtype=np.float32) * 0.5
        self.requests: list[list[int]] = []
        self.pinned = 0

    def observe(self, j: int, experts: np.ndarray) -> None:
        pass

    def acquire_experts(self, j: int, experts: np.ndarray) -> np.ndarray:
        self.requests.append([int(e) for e in experts])
        self.pinned += len(experts)
        slots = self.slot_of[np.asarray(experts)].astype(np.int64)
        assert len(set(slots.tolist())) == len(slots) <= self.num_slots
        return slots

    def release_experts(self, j: int, slots: np.ndarray) -> None:
        self.pinned -= len(slots)

    def run_slots(self, rows_RD, counts_S, compute):
        x, counts = rows_RD.numpy(), counts_S.numpy()
        assert counts.dtype == np.int32 and counts.shape == (self.num_slots,)
        assert counts.sum() == x.shape[0]
        slot_of_row = np.repeat(np.arange(self.num_slots), counts)
        return paddle.to_tensor(x * self.scale[slot_of_row][:, None] + slot_of_row[:, None].astype(np.float32))


def _expected(p: _FakeSlots, rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    n = int(counts.sum())
    expert_of_row = np.repeat(np.arange(counts.size), counts)
    s = p.slot_of[expert_of_row]
    out = np.zeros_like(rows)
    out[:n] = rows[:n] * p.scale[s][:, None] + s[:, None].astype(np.float32)
    return out


@pytest.mark.parametrize("counts,slot_of,num_slots", [
    ([0, 1, 0, 1, 1, 0, 1, 0], [7, 3, 6, 0, 5, 2, 1, 4], 8),  # decode: one row each, scrambled slots
    ([0, 1, 0, 1, 1, 0, 1, 0], [0, 1, 2, 3, 4, 5, 6, 7], 8),  # slots ascend with experts: no permutation
    ([3, 0, 2, 5, 1, 0, 0, 4], [2, 9, 0, 7, 4, 1, 3, 5], 10),  # several rows per expert
    ([3, 0, 2, 5, 1, 0, 0, 4], [2, 9, 0, 1, 1, 0, 0, 2], 3),  # more experts than slots: chunks 0,2,3 | 4,7
])
def test_routed_rows_reach_their_experts_slot_and_come_back_in_order(counts, slot_of, num_slots):
    counts = np.array(counts, np.int32)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((int(counts.sum()), 6)).astype(np.float32)
    p = _FakeSlots(num_slots, np.array(slot_of))
    lw = LayerWeights(p, 0)
    for _ in range(2):  # the second call reuses the shared buffers
        got = lw.run(paddle.to_tensor(rows), paddle.to_tensor(counts), compute=None).numpy()
        np.testing.assert_array_equal(got, _expected(p, rows, counts))
    assert p.pinned == 0
    active = np.flatnonzero(counts).tolist()
    assert [e for r in p.requests for e in r] == active * 2


def test_padding_rows_past_the_counts_stay_zero():
    counts = np.array([1, 0, 2, 1], np.int32)
    rows = np.arange(6 * 3, dtype=np.float32).reshape(6, 3) + 1  # 4 routed rows + 2 padding
    p = _FakeSlots(4, np.array([3, 0, 1, 2]))
    got = LayerWeights(p, 0).run(paddle.to_tensor(rows), paddle.to_tensor(counts), compute=None).numpy()
    np.testing.assert_array_equal(got, _expected(p, rows, counts))
    assert not got[4:].any()


def test_no_routed_rows_give_zeros_without_running_the_ffn():
    p = _FakeSlots(4, np.arange(4))
    got = LayerWeights(p, 0).run(paddle.zeros([2, 3]), paddle.zeros([4], dtype="int32"), compute=None).numpy()
    np.testing.assert_array_equal(got, np.zeros((2, 3), np.float32))
    assert p.requests == []


def test_returned_rows_are_not_overwritten_by_the_next_call():
    counts = np.array([1, 1, 1, 1], np.int32)
    p = _FakeSlots(4, np.array([3, 2, 1, 0]))
    lw = LayerWeights(p, 0)
    a = np.ones((4, 2), np.float32)
    first = lw.run(paddle.to_tensor(a), paddle.to_tensor(counts), compute=None)
    before = first.numpy().copy()
    lw.run(paddle.to_tensor(a * 7), paddle.to_tensor(counts), compute=None)
    np.testing.assert_array_equal(first.numpy(), before)


def test_a_second_thread_in_the_layer_takes_the_general_path():
    counts = np.array([2, 0, 1, 1], np.int32)
    rows = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    p = _FakeSlots(4, np.array([2, 3, 1, 0]))
    lw = LayerWeights(p, 0)
    assert lw._busy.acquire()  # as if another thread were using the shared buffers
    try:
        got = lw.run(paddle.to_tensor(rows), paddle.to_tensor(counts), compute=None).numpy()
    finally:
        lw._busy.release()
    np.testing.assert_array_equal(got, _expected(p, rows, counts))
    assert lw._counts is None and not lw._index  # the shared buffers were not touched


class _Recorder:
    def __init__(self):
        self.calls: list[tuple[int, list[int]]] = []

    def prefetch(self, j, experts):
        self.calls.append((j, sorted(int(e) for e in experts)))


@pytest.mark.parametrize("router", ["token_choice", "aux_free"])
def test_pregate_on_host_predicts_what_the_router_would_select(router):
    paddle.seed(3)
    cfg = MoEConfig(d_model=16, d_ff=8, num_experts=12, top_k=3, router=router)
    layer = MoELayer(cfg)
    layer.eval()
    if router == "aux_free":
        layer.router.balance_bias.set_value(paddle.to_tensor(np.linspace(-1, 1, 12).astype(np.float32)))
    rec = _Recorder()
    gate = _PreGate(rec, layer, 5)  # type: ignore[arg-type]
    assert _host_router(layer.router) is not None
    x = paddle.randn([2, 3, 16])
    gate(layer, (x,))
    out = layer.router(x.reshape([-1, 16]))
    scores = out.logits if out.select_bias is None else out.logits + out.select_bias
    want = sorted(set(paddle.topk(scores, 3, axis=-1)[1].numpy().ravel().tolist()))
    assert rec.calls == [(5, want)]
