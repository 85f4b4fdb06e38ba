"""A full disk during a save of a real 2-process EP=2 job (``SEMOE_CKPT_FAULT``, the checkpoint
writer's fault point): one ``error:`` line per rank, exit status 1, no partial ``.tmp`` left, the
earlier checkpoint intact, and ``train.resume=auto`` continues from it to the end."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from paddle_semoe.comm import SimulatedWorld
from paddle_semoe.comm.topology import CommGroup
from paddle_semoe.engine import checkpoint as engine_ckpt
from paddle_semoe.io import checkpoint as ck
from tests.dist import train_runner as tr

CONFIG = Path(__file__).resolve().parents[1] / "assets" / "gpt_moe_test.yaml"


def test_fault_spec_is_parsed_and_a_bad_one_named():
    assert engine_ckpt._parse_fault(None) == (0, None)
    assert engine_ckpt._parse_fault("enospc:3") == (3, None)
    assert engine_ckpt._parse_fault("enospc:2@1") == (2, 1)
    for bad in ("enospc", "enospc:0", "full:1", "enospc:1@x", "enospc:-1"):
        with pytest.raises(ValueError, match=r"SEMOE_CKPT_FAULT=.*expected 'enospc:N'"):
            engine_ckpt._parse_fault(bad)


def test_fault_point_cuts_the_nth_shard_write_short_with_enospc(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_ckpt, "_shard_writes", 0)
    monkeypatch.setenv(engine_ckpt.FAULT_ENV, "enospc:2")
    full = {}

    def write_files(tmp):
        rec = ck.save_shard(tmp / ck.shard_name(0), {"w": np.arange(1000, dtype=np.float32)}, {})
        full[tmp.name] = rec.bytes
        return [rec]

    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    assert engine_ckpt._write_shards(write_files, tmp_path / "a", rank=0)[0].bytes == full["a"]
    with pytest.raises(OSError) as info:  # the 2nd write of this process: a partial file and ENOSPC
        engine_ckpt._write_shards(write_files, tmp_path / "b", rank=0)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "b" / ck.shard_name(0))
    assert (tmp_path / "b" / ck.shard_name(0)).stat().st_size == full["b"] // 2 > 0
    engine_ckpt._write_shards(write_files, tmp_path / "c", rank=0)  # only the N-th one fails

    monkeypatch.setattr(engine_ckpt, "_shard_writes", 0)
    monkeypatch.setenv(engine_ckpt.FAULT_ENV, "enospc:1@1")  # another rank's fault: this one writes on
    assert engine_ckpt._write_shards(write_files, tmp_path / "a", rank=0)[0].bytes == full["a"]


def test_injected_full_disk_is_one_error_on_every_simulated_rank(tmp_path, monkeypatch):
    """Both simulated ranks share this process's counter: whichever writes first hits the full disk."""
    monkeypatch.setattr(engine_ckpt, "_shard_writes", 0)
    monkeypatch.setenv(engine_ckpt.FAULT_ENV, "enospc:1")
    sim = SimulatedWorld(2, timeout_s=30)

    def rank_fn(r: int):
        def write_files(tmp):
            return [ck.save_shard(tmp / ck.shard_name(r), {"w": np.arange(1000, dtype=np.float32)}, {})]

        try:
            engine_ckpt.write_checkpoint(tmp_path, 3, sim.communicator(r), CommGroup("world", (0, 1), r),
                                         write_files=write_files, meta={}, keep=2)
        except ck.CheckpointError as err:
            return str(err)
        return "saved"

    msgs = sim.run(rank_fn)
    assert msgs[0] == msgs[1] and msgs[0].startswith("saving checkpoint step_00000003 failed: disk full"), msgs
    assert "\n" not in msgs[0]
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "step_00000003").exists()


def _error_lines(log_dir: Path) -> list[list[str]]:
    return [[ln for ln in p.read_text(errors="replace").splitlines() if ln.startswith("error:")]
            for p in sorted(log_dir.glob("workerlog.*"))]


def test_full_disk_in_a_two_process_save_is_one_line_per_rank_and_resumable(tmp_path, monkeypatch):
    run = tmp_path / "run"
    common = [f"train.output_dir={run}", "train.eval_every=1000", "train.save_every=3", "train.max_steps=6",
              "parallel.comm_timeout_s=60"]
    monkeypatch.setenv(engine_ckpt.FAULT_ENV, "enospc:2@1")  # rank 1's second save (step 6) hits a full disk
    res = tr.run(2, CONFIG, common, tmp_path, timeout_s=200)
    assert res.returncode == 1, res.output[-3000:]
    per_rank = _error_lines(tmp_path / "launch_0")
    assert len(per_rank) == 2, res.output[-3000:]
    for lines in per_rank:
        assert len(lines) == 1, res.output[-3000:]
        assert lines[0] == ("error: saving checkpoint step_00000006 failed: disk full (No space left on device) on "
                            "rank 1 while writing the shards; the partial files were removed and earlier checkpoints "
                            "are intact"), lines[0]
    assert "Traceback" not in res.output
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000003"]
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    ck.read_manifest(ckpts / "step_00000003")  # sizes and checksums of every file verify

    monkeypatch.delenv(engine_ckpt.FAULT_ENV)
    res = tr.run(2, CONFIG, common + ["train.resume=auto"], tmp_path, timeout_s=200)
    assert res.returncode == 0, res.output[-3000:]
    assert "resumed from" in res.output and "step_00000003" in res.output
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    assert not list(ckpts.glob("*.tmp"))
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln).get("kind") == "train"]
    assert steps == list(range(1, 7))
