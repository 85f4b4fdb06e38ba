"""The restart wrapper (paddle_semoe.elastic.launch) understands the preempted status: a job
that saved a checkpoint and exited 75 is relaunched without using up a restart."""

from __future__ import annotations

import sys
from pathlib import Path

from paddle_semoe.elastic import launch
from paddle_semoe.engine.launch_env import EXIT_PREEMPTED

SCRIPT = """import sys
from pathlib import Path
log = Path(sys.argv[1]); codes = [int(c) for c in sys.argv[2].split(",")]
n = len(log.read_text().splitlines()) if log.exists() else 0
log.write_text((log.read_text() if log.exists() else "") + sys.argv[3] + "\\n")
sys.exit(codes[min(n, len(codes) - 1)])
"""


def _run(tmp_path: Path, monkeypatch, codes: str, max_restart: int) -> tuple[int, list[str]]:
    script, log = tmp_path / "job.py", tmp_path / "attempts.log"
    script.write_text(SCRIPT)
    monkeypatch.setattr(launch, "launch_command",
                        lambda nproc, log_dir, rest: [sys.executable, str(script), str(log), codes, log_dir])
    rc = launch.main(["--max_restart", str(max_restart), "--nproc_per_node", "1", "--log_dir", str(tmp_path / "log"),
                      "train.py"])
    return rc, log.read_text().splitlines()


def test_preempted_jobs_are_relaunched_without_using_a_restart(tmp_path, monkeypatch):
    rc, dirs = _run(tmp_path, monkeypatch, f"{EXIT_PREEMPTED},{EXIT_PREEMPTED},0", max_restart=0)
    assert rc == 0 and len(dirs) == 3
    assert dirs[1].endswith("preempted1") and dirs[2].endswith("preempted2")


def test_failures_still_use_up_restarts(tmp_path, monkeypatch):
    rc, dirs = _run(tmp_path, monkeypatch, f"1,{EXIT_PREEMPTED},1,0", max_restart=1)
    assert rc == 1 and len(dirs) == 3  # fail, (restart 1) preempted, fail again: no restarts left
