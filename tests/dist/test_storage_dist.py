"""Hierarchical expert storage end to end through tools/train.py (CPU, Gloo).

* storage on == all-resident training (both with the lazy expert update), bit for bit, on 1
  process and on 2 processes (EP=2), with a host cache too small for the experts of one step;
* SIGKILL in the middle of a write-back (fault injection): every expert state file still
  verifies against its checksums, and ``train.resume=auto`` continues bit-identically;
* a checkpoint of the SSD tier taken with EP=2 resumes on one process (files are per global
  expert);
* both prefetch axes at once (tiered experts + dense parameters sharded over a sharding group of
  2 and all-gathered ahead of each block): same losses as all-resident training to float32
  rounding, and an exact resume from its checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist import train_runner as tr

pytestmark = pytest.mark.dist

CONFIG = Path(__file__).resolve().parents[1] / "assets" / "gpt_moe_test.yaml"
LAZY = ["optim.expert_update=lazy", "train.eval_every=4"]
# 8 expert states of 0.19 MiB per rank (1 process) or 4 (2 processes): room for 3 -> evictions,
# write-backs and SSD reads in every step
TIERED = ["storage.enabled=true", "storage.host_cache_mb=0.6", "storage.working_set_mb=2", "storage.writeback_every=3"]


def _ok(res: tr.RunResult) -> None:
    assert res.returncode == 0, res.output[-6000:]


def _assert_same(a: dict[int, dict], b: dict[int, dict], steps, keys=("loss", "lm_loss", "aux_loss", "grad_norm")) -> None:
    for s in steps:
        for k in keys:
            assert a[s][k] == b[s][k], f"step {s} {k}: {a[s][k]!r} != {b[s][k]!r}"


@pytest.fixture(scope="module")
def resident_runs(tmp_path_factory):
    """All-resident lazy-update runs (8 steps) on 1 and 2 processes, shared by the tests below."""
    work = tmp_path_factory.mktemp("resident")
    out = {}
    for nproc in (1, 2):
        common = LAZY + ["train.max_steps=8", "train.save_every=0"] + (["parallel.ep_degree=1"] if nproc == 1 else [])
        _ok(tr.run(nproc, CONFIG, common + [f"train.output_dir={work}/r{nproc}"], work))
        out[nproc] = work / f"r{nproc}"
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_storage_on_is_bit_identical_to_all_resident(tmp_path, nproc, resident_runs):
    common = LAZY + ["train.max_steps=8", "train.save_every=0"] + (["parallel.ep_degree=1"] if nproc == 1 else [])
    _ok(tr.run(nproc, CONFIG, common + TIERED + [f"train.output_dir={tmp_path}/tiered"], tmp_path))
    (tmp_path / "resident").symlink_to(resident_runs[nproc])
    ref = tr.metrics(tmp_path / "resident" / "metrics.jsonl")
    got = tr.metrics(tmp_path / "tiered" / "metrics.jsonl")
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    _assert_same(ref, got, range(1, 9))
    _assert_same(tr.metrics(tmp_path / "resident" / "metrics.jsonl", kind="val"),
                 tr.metrics(tmp_path / "tiered" / "metrics.jsonl", kind="val"), (4, 8), keys=("loss",))
    storage = tr.metrics(tmp_path / "tiered" / "metrics.jsonl", kind="storage")
    assert sorted(storage) == list(range(1, 9))
    last = storage[8]
    for key in ("hit_rate", "ssd_read_bytes_per_step", "ssd_write_bytes_per_step", "prefetch_wait_s_per_step",
                "host_resident_bytes", "device_resident_bytes", "ssd_resident_bytes", "alpha"):
        assert key in last, key
    assert sum(s["ssd_read_bytes_per_step"] for s in storage.values()) > 0
    assert sum(s["evictions_per_step"] for s in storage.values()) > 0
    assert last["host_resident_bytes"] <= last["host_capacity_bytes"]


def test_kill_during_write_back_then_resume_is_bit_identical(tmp_path, monkeypatch):
    from paddle_semoe.storage.layout import ExpertStateLayout
    from paddle_semoe.storage.ssd import SSDTier

    common = LAZY + TIERED + ["parallel.ep_degree=1", "train.max_steps=12", "train.save_every=4", "train.keep_checkpoints=3"]
    _ok(tr.run(1, CONFIG, common + [f"train.output_dir={tmp_path}/ref"], tmp_path))
    ref = tr.metrics(tmp_path / "ref" / "metrics.jsonl")
    # the same run, SIGKILLed halfway through its 40th write-back (after the step-4 checkpoint)
    run_dir = tmp_path / "run"
    monkeypatch.setenv("SEMOE_STORAGE_FAULT", "kill_in_writeback:40")
    crashed = tr.run(1, CONFIG, common + [f"train.output_dir={run_dir}"], tmp_path)
    monkeypatch.delenv("SEMOE_STORAGE_FAULT")
    assert crashed.returncode == -9, crashed.output[-3000:]
    assert "fault injection" in crashed.output
    store = run_dir / "expert_store" / "rank_00000"
    torn = list(store.glob("*.tmp"))
    assert len(torn) == 1, "the kill must leave the interrupted write-back's partial file"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    resumed_from = int(latest.split("_")[1])
    assert resumed_from in (4, 8)
    # every expert state file verifies against its header and payload checksums
    tier = SSDTier(store, ExpertStateLayout(64, 128))
    files = sorted(p.name for p in store.glob("*.bin"))
    assert len(files) == 8
    infos = tier.verify_all([(int(n[1:4]), int(n[6:12])) for n in files])
    assert all(i.seq >= resumed_from for i in infos)  # newer than the checkpoint: resume must not use them
    _ok(tr.run(1, CONFIG, common + [f"train.output_dir={run_dir}", "train.resume=auto"], tmp_path))
    assert not list(store.glob("*.tmp"))  # recovery removed the torn file
    logged = tr.logged_steps(run_dir / "metrics.jsonl")
    assert logged == sorted(set(logged)) == list(range(1, 13)), logged  # no step logged twice
    new = tr.metrics(run_dir / "metrics.jsonl", after_step=resumed_from)
    assert min(new) == resumed_from + 1 and max(new) == 12
    _assert_same(ref, new, range(resumed_from + 1, 13))


def test_ssd_tier_checkpoint_reshards_from_two_processes_to_one(tmp_path):
    common = LAZY + TIERED + ["train.max_steps=4"]
    _ok(tr.run(2, CONFIG, common + [f"train.output_dir={tmp_path}/a"], tmp_path))
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000004"
    assert len(list((ckpt / "experts").glob("*.bin"))) == 8 and len(list((ckpt / "experts").glob("rank_*.json"))) == 2
    _ok(tr.run(1, CONFIG, common + ["parallel.ep_degree=1", f"train.output_dir={tmp_path}/b", f"train.resume={ckpt}"], tmp_path))
    val_a = tr.metrics(tmp_path / "a" / "metrics.jsonl", kind="val")[4]["loss"]
    val_b = tr.metrics(tmp_path / "b" / "metrics.jsonl", kind="val")[4]["loss"]
    assert abs(val_a - val_b) < 1e-5, (val_a, val_b)


def test_two_dimensional_prefetch_matches_resident_and_resumes_exactly(tmp_path, resident_runs):
    common = LAZY + TIERED + ["storage.shard_dense=true", "parallel.sharding_degree=2", "train.max_steps=8", "train.save_every=4"]
    _ok(tr.run(2, CONFIG, common + [f"train.output_dir={tmp_path}/a"], tmp_path))
    got = tr.metrics(tmp_path / "a" / "metrics.jsonl")
    ref = tr.metrics(resident_runs[2] / "metrics.jsonl")
    assert sorted(got) == list(range(1, 9))
    for s in range(1, 9):  # dense AdamW in numpy on shards vs Paddle's AdamW: float32 rounding apart
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=2e-5, abs=1e-6), s
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000004"
    _ok(tr.run(2, CONFIG, common + [f"train.output_dir={tmp_path}/b", f"train.resume={ckpt}"], tmp_path))
    _assert_same(got, tr.metrics(tmp_path / "b" / "metrics.jsonl"), range(5, 9))
