"""Worker of the hang tests: ``tools/train.py`` on every rank, with rank 1 made to hang at the
point named by the environment variable ``SEMOE_TEST_HANG`` (test instrumentation only: the
library has no hook for this; the worker wraps the trainer from outside):

``nan_check``
    rank 1 sleeps right before the all-reduce max of the non-finite step flag of step 2;
``checkpoint_barrier``
    rank 1 sleeps right before entering the collective checkpoint writer (whose first act is a
    barrier) of the first checkpoint.

Rank 1 writes the time it starts hanging to ``<out>/hang_start``; rank 0 writes the time its
collective watchdog fires to ``<out>/watchdog_fired`` and then lets the watchdog end the
process as usual (exit status 124).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

import train as train_tool  # noqa: E402  (tools/train.py)

from paddle_semoe.comm import watchdog  # noqa: E402
from paddle_semoe.engine import trainer as trainer_mod  # noqa: E402

HANG_S = 600.0  # far beyond any watchdog bound of the tests: the peer must not wait for it


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args, train_argv = parser.parse_known_args()
    out = Path(args.out)
    point = os.environ.get("SEMOE_TEST_HANG", "")
    if point not in ("nan_check", "checkpoint_barrier"):
        raise SystemExit(f"SEMOE_TEST_HANG must be nan_check or checkpoint_barrier, got {point!r}")
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))

    def hang() -> None:
        (out / "hang_start").write_text(repr(time.time()))
        time.sleep(HANG_S)

    if rank == 1 and point == "nan_check":
        any_rank_bad = trainer_mod.Trainer._any_rank_bad

        def hanging_check(self, loss: float, grad_norm: float) -> bool:
            if self.step == 1:
                hang()
            return any_rank_bad(self, loss, grad_norm)

        trainer_mod.Trainer._any_rank_bad = hanging_check
    elif rank == 1:
        write_checkpoint = trainer_mod.write_checkpoint

        def hanging_writer(*a, **kw):
            hang()
            return write_checkpoint(*a, **kw)

        trainer_mod.write_checkpoint = hanging_writer
    if rank == 0:
        end_process = watchdog._default_on_timeout

        def recording_end(message: str) -> None:
            (out / "watchdog_fired").write_text(repr(time.time()))
            end_process(message)

        watchdog._default_on_timeout = recording_end
    return train_tool.main(train_argv)


if __name__ == "__main__":
    sys.exit(main())
