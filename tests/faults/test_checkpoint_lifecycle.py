"""Checkpoint lifecycle: pruning by save order, the resumed-from checkpoint kept until a newer one
is verified, ``resume=auto`` refusing a corrupt newest checkpoint by name with an explicit
fallback (``auto_verified``), a full disk during a collective save, stale partial directories."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np
import pytest

from paddle_semoe.comm import SimulatedWorld
from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.engine.checkpoint import write_checkpoint
from paddle_semoe.io import checkpoint as ck
from tests.dist import train_runner as tr

CONFIG = Path(__file__).resolve().parents[1] / "assets" / "gpt_moe_test.yaml"


def _save(root: Path, step: int, keep: int, protect: Path | None = None) -> Path:
    d = root / (ck.step_dir_name(step) + ".tmp")
    d.mkdir(parents=True)
    rec = ck.save_shard(d / ck.shard_name(0), {"w": np.full(4, step, np.float32)}, {"step": step})
    ck.write_manifest(d, step, 1, [rec], {})
    final = root / ck.step_dir_name(step)
    ck.publish(d, final, keep=keep, protect=protect)
    time.sleep(0.01)  # distinct publication times
    return final


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


def test_pruning_goes_by_save_order_not_by_step_name(tmp_path):
    _save(tmp_path, 100, keep=2)
    bad = _save(tmp_path, 200, keep=2)
    _corrupt(bad / "rank_00000.npz")
    # the run resumed from step 100 (200 was refused) and now saves 150: by step name, 150 would
    # be the one removed with keep=1 and the corrupt 200 kept
    resumed = tmp_path / "step_00000100"
    _save(tmp_path, 150, keep=1, protect=resumed)
    assert _names(tmp_path) == ["step_00000150"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000150"


def test_resumed_from_checkpoint_is_kept_until_a_newer_one_verifies(tmp_path, monkeypatch):
    resumed = _save(tmp_path, 100, keep=1)
    real = ck.read_manifest

    def newer_is_bad(path, verify=True):
        if Path(path).name == "step_00000150" and verify:
            raise ck.CheckpointError("checkpoint file step_00000150/rank_00000.npz is corrupt")
        return real(path, verify)

    monkeypatch.setattr(ck, "read_manifest", newer_is_bad)
    _save(tmp_path, 150, keep=1, protect=resumed)
    assert _names(tmp_path) == ["step_00000100", "step_00000150"]  # 100 survives: 150 did not verify
    monkeypatch.setattr(ck, "read_manifest", real)
    _save(tmp_path, 200, keep=1, protect=resumed)
    assert _names(tmp_path) == ["step_00000200"]


def test_auto_verified_falls_back_to_the_newest_good_checkpoint_naming_the_bad(tmp_path, caplog):
    _save(tmp_path, 4, keep=3)
    bad = _save(tmp_path, 8, keep=3)
    _corrupt(bad / "rank_00000.npz")
    assert ck.resolve_checkpoint("auto", tmp_path) == bad  # auto: the newest; loading it refuses it by name
    with caplog.at_level("WARNING"):
        assert ck.resolve_checkpoint("auto_verified", tmp_path) == tmp_path / "step_00000004"
    assert "step_00000008/rank_00000.npz is corrupt" in caplog.text
    _corrupt(tmp_path / "step_00000004" / "rank_00000.npz")
    with pytest.raises(ck.CheckpointError, match="no verified checkpoint in"):
        ck.resolve_checkpoint("auto_verified", tmp_path)


def test_stale_partial_directories_are_swept(tmp_path):
    good = _save(tmp_path, 4, keep=2)
    (tmp_path / "step_00000006.tmp").mkdir()
    (tmp_path / "step_00000006.tmp" / "rank_00000.npz").write_bytes(b"half")
    (tmp_path / "step_00000004.old").mkdir()
    assert sorted(p.name for p in ck.remove_partial(tmp_path)) == ["step_00000004.old", "step_00000006.tmp"]
    assert _names(tmp_path) == ["step_00000004"] and ck.read_manifest(good)


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_disk_full_during_a_save_is_one_error_on_every_rank(tmp_path, failing_rank):
    _save(tmp_path, 4, keep=2)
    before = (tmp_path / "latest").read_text()
    sim = SimulatedWorld(2, timeout_s=30)

    def rank_fn(r: int):
        world = CommGroup("world", (0, 1), r)

        def write_files(tmp):
            if r == failing_rank:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / ck.shard_name(r)))
            return [ck.save_shard(tmp / ck.shard_name(r), {"w": np.zeros(2, np.float32)}, {})]

        try:
            write_checkpoint(tmp_path, 8, sim.communicator(r), world, write_files=write_files, meta={}, keep=2)
        except ck.CheckpointError as err:
            return str(err)
        return "saved"

    messages = sim.run(rank_fn)
    for m in messages:
        assert m.startswith("saving checkpoint step_00000008 failed: disk full") and f"on rank {failing_rank}" in m, m
        assert "\n" not in m
    assert not list(tmp_path.glob("*.tmp")) and _names(tmp_path) == ["step_00000004"]
    assert (tmp_path / "latest").read_text() == before
    ck.read_manifest(tmp_path / "step_00000004")


def test_train_resume_auto_names_the_corrupt_checkpoint_and_auto_verified_continues(tmp_path):
    run = tmp_path / "run"
    common = ["parallel.ep_degree=1", f"train.output_dir={run}", "train.eval_every=1000", "train.keep_checkpoints=3"]
    res = tr.run(1, CONFIG, common + ["train.max_steps=8", "train.save_every=4"], tmp_path, timeout_s=180)
    assert res.returncode == 0, res.output[-3000:]
    _corrupt(run / "checkpoints" / "step_00000008" / "rank_00000.npz")
    res = tr.run(1, CONFIG, common + ["train.max_steps=12", "train.resume=auto"], tmp_path, timeout_s=180)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.returncode != 0 and len(errors) == 1, res.output[-3000:]
    assert "step_00000008/rank_00000.npz is corrupt" in errors[0] and "train.resume=auto_verified" in errors[0]
    res = tr.run(1, CONFIG, common + ["train.max_steps=12", "train.resume=auto_verified"], tmp_path, timeout_s=180)
    assert res.returncode == 0, res.output[-3000:]
    assert "resumed from" in res.output and "step_00000004" in res.output
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000012"
