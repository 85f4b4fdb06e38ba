"""A rank that hangs (alive, never joins) during the non-finite step check or a checkpoint
barrier makes the other rank fail within ``parallel.comm_timeout_s``, with a message naming the
collective, the group and the peer (tools/train.py on 2 CPU processes, EP=2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist.launch import launch

pytestmark = pytest.mark.dist

WORKER = Path(__file__).resolve().parent / "hang_train_worker.py"
CONFIG = Path(__file__).resolve().parents[1] / "assets" / "gpt_moe_test.yaml"
TIMEOUT = 5.0


@pytest.mark.parametrize(
    "point, collective",
    [
        ("nan_check", "all_reduce[max] (non-finite step check)"),
        # the writer's first synchronisation: every rank agrees that the directory exists (an
        # all-reduce of the failure flag, which is also the barrier before the shards are written)
        ("checkpoint_barrier", "all_reduce[max] (checkpoint step_00000002.tmp: creating the directory)"),
    ],
)
def test_hung_rank_makes_the_other_fail_within_comm_timeout(tmp_path, monkeypatch, point, collective):
    monkeypatch.setenv("SEMOE_TEST_HANG", point)
    overrides = [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=4", "train.save_every=2",
                 "train.eval_every=1000", f"parallel.comm_timeout_s={TIMEOUT}"]
    args = ["-c", str(CONFIG), "--threads", "1"] + [a for o in overrides for a in ("-o", o)]
    res = launch(WORKER, 2, tmp_path, args, timeout_s=150)
    assert res.returncode == 124, res.describe()  # WATCHDOG_EXIT_CODE, propagated by the launcher
    log = res.logs[0]
    expected = f"{collective} on group dp[ranks 0,1] with peer 1 did not finish within {TIMEOUT:.1f}s"
    assert expected in log, res.describe()
    started = float((tmp_path / "hang_start").read_text())
    fired = float((tmp_path / "watchdog_fired").read_text())
    # rank 0 reaches the collective right after rank 1 starts hanging; it gives up one timeout later
    assert TIMEOUT - 0.5 <= fired - started <= TIMEOUT + 3.0, (fired - started, res.describe())
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()  # nothing was published
