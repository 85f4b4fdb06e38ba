"""The short chaos run (CI): a 2-process EP=2 training hit by a full disk during a save, then
SIGKILLed / SIGTERMed at random moments, and resumed with train.resume=auto each time, ends
bit-identical to an uninterrupted run, with no partial checkpoint left and no metrics step
repeated. The long variant (faults drawn at random): ``python tools/chaos.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _chaos():
    spec = importlib.util.spec_from_file_location("tool_chaos", ROOT / "tools" / "chaos.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_short_chaos_run_is_bit_identical(tmp_path):
    lines: list[str] = []
    report = _chaos().run_chaos(tmp_path, count=3, seed=3, max_steps=12, save_every=3, job_timeout_s=200,
                                log=lines.append, order=("full_disk", "kill_rank", "term_launcher"))
    summary = "\n".join(lines)
    assert sum(report.faults.values()) >= 2, summary  # interruptions really happened
    assert report.faults["full_disk"] == 1, summary  # deterministic: the first launch runs into a full disk
    assert not report.full_disk_problems, f"{report.full_disk_problems}\n{summary}"
    assert report.identical, f"parameters differ: {report.mismatched[:5]}\n{summary}"
    assert not report.leftover_tmp, report.leftover_tmp
    assert not report.repeated_steps, summary
    assert report.max_job_seconds < 200
