"""Training faults: a second run on one output directory, preemption by SIGTERM, metrics after
a resume, a full disk during a save, checkpoint pruning and the resume fallback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paddle_semoe.engine.launch_env import EXIT_PREEMPTED
from paddle_semoe.engine.metrics import MetricsLogger
from paddle_semoe.engine.preempt import StopRequest
from paddle_semoe.engine.run_lock import RunLockError, lock_output_dir
from tests.dist import train_runner as tr

CONFIG = Path(__file__).resolve().parents[1] / "assets" / "gpt_moe_test.yaml"


# ----------------------------------------------------------------------------- output-directory lock
def test_second_run_on_one_output_dir_is_refused_naming_the_holder(tmp_path):
    held = lock_output_dir(tmp_path, rank=0)
    try:
        with pytest.raises(RunLockError, match=rf"in use by another run \(pid {os.getpid()} on .+, started 20"):
            lock_output_dir(tmp_path, rank=0)
        lock_output_dir(tmp_path, rank=1).release()  # another rank of the same job has its own lock
    finally:
        held.release()
    lock_output_dir(tmp_path, rank=0).release()  # released: free again


def test_lock_of_a_killed_run_is_stale_and_taken_over(tmp_path, caplog):
    code = ("import os, sys; from paddle_semoe.engine.run_lock import lock_output_dir\n"
            f"lock_output_dir({str(tmp_path)!r}, 0); print('locked', flush=True); os.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL and "locked" in r.stdout
    with caplog.at_level("WARNING"):
        lock = lock_output_dir(tmp_path, 0)
    lock.release()
    assert "taking over the stale lock" in caplog.text


def test_train_tool_refuses_a_busy_output_dir_in_one_line(tmp_path):
    held = lock_output_dir(tmp_path / "run", rank=0)
    try:
        res = tr.run(1, CONFIG, [f"train.output_dir={tmp_path}/run", "parallel.ep_degree=1"], tmp_path, timeout_s=120)
    finally:
        held.release()
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.returncode == 1, res.output[-3000:]
    assert len(errors) == 1 and "is in use by another run" in errors[0] and "Traceback" not in res.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- metrics after a resume
def test_metrics_drop_records_after_the_resumed_step(tmp_path):
    m = MetricsLogger(tmp_path, None)
    for s in range(1, 7):
        m.scalars(s, {"loss": float(s)})
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "kind": "tr')  # torn by a kill
    m = MetricsLogger(tmp_path, None)
    assert m.drop_after(4) == 3
    m.scalars(5, {"loss": 50.0})
    m.close()
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- preemption
def test_stop_request_flags_sigterm_and_a_second_ctrl_c_stops_at_once():
    req = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert req.requested and req.signame == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # after SIGTERM: still a graceful stop
        req2 = StopRequest().install()
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        req2.restore()
    finally:
        req.restore()


def _final_arrays(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    out = {}
    for shard in sorted(ckpt.glob("rank_*.npz")):
        with np.load(shard, allow_pickle=False) as z:
            out.update({f"{shard.name}/{k}": z[k] for k in z.files if k != "__meta__"})
    return out


def test_sigterm_saves_on_every_rank_and_resume_continues_bit_identically(tmp_path):
    common = ["train.max_steps=10", "train.save_every=0", "train.eval_every=1000"]
    ref = tr.run(2, CONFIG, common + [f"train.output_dir={tmp_path}/ref"], tmp_path)
    assert ref.returncode == 0, ref.output[-4000:]
    run_dir = tmp_path / "run"
    job = tr.start(2, CONFIG, common + [f"train.output_dir={run_dir}"], tmp_path)
    try:
        tr.wait_for(lambda: 3 in tr.metrics(run_dir / "metrics.jsonl"), 180, "step 3")
        job.send_signal(signal.SIGTERM)  # the launcher terminates its workers, as a scheduler would
        job.wait(timeout=90)
    finally:
        tr.kill(job)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("launch_1/workerlog.*")))
    assert logs.count("preempted: stopped by SIGTERM at step") == 2, logs[-4000:]  # one line per rank
    saved = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= saved < 10
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    res = tr.run(2, CONFIG, common + [f"train.output_dir={run_dir}", "train.resume=auto"], tmp_path)
    assert res.returncode == 0, res.output[-4000:]
    a, b = _final_arrays(tmp_path / "ref", 10), _final_arrays(run_dir, 10)
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    steps = [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln).get("kind") == "train"]
    assert steps == list(range(1, 11)), steps  # no repeated steps after the resume


def test_preempted_single_process_exits_with_the_preempted_status(tmp_path):
    cmd = tr.command(1, CONFIG, ["train.max_steps=200", "train.save_every=0", "train.eval_every=1000",
                                 "parallel.ep_degree=1", f"train.output_dir={tmp_path}/run"], tmp_path)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=tr._env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        tr.wait_for(lambda: 2 in tr.metrics(tmp_path / "run" / "metrics.jsonl"), 120, "step 2")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        tr.kill(proc)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "Traceback" not in out
    assert [ln for ln in out.splitlines() if ln.startswith("preempted:")][0].endswith(
        "rerun with -o train.resume=auto to continue")
