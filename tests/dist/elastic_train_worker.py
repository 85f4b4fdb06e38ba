"""Worker of the elastic multi-process tests: ``ufo_example/train.py`` plus fault injection.

    elastic_train_worker.py --out DIR [--kill_at RANK:STEP] -- <train.py arguments>

``--kill_at R:S``: rank ``R`` SIGKILLs itself when it is about to run step ``S`` (0-based: after
``S`` steps are done), in the first attempt of a job only (``SEMOE_ELASTIC_RESTART`` unset or
0), like a machine failure in the middle of training.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kill_at", type=str, default=None)
    args, rest = p.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.kill_at and os.environ.get("SEMOE_ELASTIC_RESTART", "0") == "0":
        kill_rank, kill_step = (int(v) for v in args.kill_at.split(":"))
        from paddle_semoe.elastic.trainer import ElasticTrainer

        original = ElasticTrainer.train_step

        def train_step(self):
            if self.rank == kill_rank and self.step == kill_step:
                (args.out / f"killed_rank{kill_rank}_step{kill_step}").write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self)

        ElasticTrainer.train_step = train_step
    from ufo_example import train

    return train.main(rest)


if __name__ == "__main__":
    sys.exit(main())
