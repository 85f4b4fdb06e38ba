"""Training metrics: VisualDL scalars and histograms, a JSONL log, a progress line with ETA.

Only rank 0 writes (other ranks get a :class:`MetricsLogger` that does nothing). VisualDL is
optional at import time: if it is missing while ``monitor.visualdl`` is on, the logger says
so once and keeps writing the JSONL file.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from paddle_semoe.io.files import write_atomic

logger = logging.getLogger(__name__)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Writes scalars/histograms to VisualDL and one JSON object per record to ``metrics.jsonl``.

    Args:
        output_dir: run directory; the JSONL file goes to ``<output_dir>/metrics.jsonl``.
        logdir: VisualDL log directory (None: no VisualDL).
        enabled: False on ranks other than 0.
    """

    def __init__(self, output_dir: Path, logdir: Path | None, enabled: bool = True):
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        self.jsonl_path = Path(output_dir) / "metrics.jsonl"
        self.logdir = logdir
        if not enabled:
            return
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if logdir is not None:
            try:
                from visualdl import LogWriter
            except ImportError:
                logger.warning("visualdl is not installed: no VisualDL logs (pip install visualdl); metrics go to %s", self.jsonl_path)
                self.logdir = None
            else:
                Path(logdir).mkdir(parents=True, exist_ok=True)
                self._writer = LogWriter(logdir=str(logdir))

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step, "time": time.time(), "kind": prefix}
        for k, v in values.items():
            v = float(v)
            record[k] = v
            if self._writer is not None and math.isfinite(v):
                self._writer.add_scalar(tag=f"{prefix}/{k}", value=v, step=step)
        self._write(record)

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        """Expert-load histogram: ``values[e]`` = tokens routed to expert e."""
        if not self.enabled:
            return
        values = np.asarray(values, dtype=np.float64)
        self._write({"step": step, "kind": "histogram", "tag": tag, "values": values.tolist()})
        if self._writer is not None and values.size:
            # one sample per routed token at its expert index: the histogram shows the load per expert
            samples = np.repeat(np.arange(values.size, dtype=np.float64), values.astype(np.int64))
            if samples.size:
                self._writer.add_histogram(tag=tag, values=samples, step=step, buckets=int(values.size))

    def _write(self, record: dict[str, Any]) -> None:
        if self._jsonl is None:
            raise RuntimeError(f"metrics logger for {self.jsonl_path} is closed: nothing can be logged after close()")
        self._jsonl.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> int:
        """Remove the ``metrics.jsonl`` records of steps after ``step`` (a resumed run repeats
        them: they were logged after the checkpoint it resumes from). Rewritten atomically;
        returns how many records were removed (0 on ranks that do not write)."""
        if not self.enabled or self._jsonl is None:
            return 0
        self._jsonl.close()
        kept, dropped = [], 0
        for line in self.jsonl_path.read_text().splitlines():
            try:
                later = int(json.loads(line).get("step", 0)) > step
            except (ValueError, AttributeError, TypeError):
                later = True  # a torn last line of a killed run
            if later:
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped:
            write_atomic(self.jsonl_path, "".join(kept).encode())
            logger.info("metrics: removed %d record(s) after step %d from %s", dropped, step, self.jsonl_path)
        self._jsonl = open(self.jsonl_path, "a", buffering=1)
        return dropped

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


class Progress:
    """Step timing and a one-line progress report with ETA."""

    def __init__(self, start_step: int, max_steps: int):
        self.start_step = start_step
        self.max_steps = max_steps
        self.t0 = time.perf_counter()
        self.last_t = self.t0
        self.last_step = start_step

    def interval(self, step: int) -> tuple[float, int]:
        """(seconds, steps) since the previous call."""
        now = time.perf_counter()
        dt, ds = now - self.last_t, step - self.last_step
        self.last_t, self.last_step = now, step
        return dt, ds

    def eta(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / done * (self.max_steps - step)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
