"""Restart a ``paddle.distributed.launch`` job from its last checkpoint when a worker dies.

Finding (Paddle 3.3.1, read from ``paddle/distributed/launch`` and checked on CPU/Gloo):
``--max_restart`` is only honoured by ``CollectiveElasticController``, which is selected only
when ``--master`` is an ``etcd://`` address. The default collective controller deploys the
pod once: when a worker exits non-zero it stops the other workers and exits (status 241 or 1
here, after a worker was SIGKILLed), whatever ``--max_restart`` and ``--elastic_level`` say. Without an
etcd server the launcher never restarts anything.

This module is the restart loop for that case: it runs ``python -m paddle.distributed.launch``
with the given arguments and, when the job fails, runs it again, up to ``--max_restart``
times. Each attempt is a fresh job (new processes, new Gloo rendezvous); the training script
must resume from its latest checkpoint (``train.resume=auto``, the default of the elastic
trainer). ``SEMOE_ELASTIC_RESTART`` tells the workers which attempt they are.
``--nproc_schedule 4,2`` changes the number of processes per attempt (elastic resize after a
failure: e.g. continue on fewer ranks).

Preemption: a job whose workers were stopped by SIGTERM/SIGINT after saving a checkpoint exits
with status 75 (``EXIT_PREEMPTED`` of :mod:`paddle_semoe.engine.launch_env`; the launcher passes
the first failing worker's status on). That is not a failure: the wrapper relaunches it at once
without using up a restart. When the wrapper itself receives SIGTERM/SIGINT (the scheduler
preempts the whole job), it forwards the signal to the launcher, which gives the workers 30 s
to finish their step and save, waits for the job to end and exits with 75 (the job saved) or
128 + the signal number.

    python -m paddle_semoe.elastic.launch --max_restart 1 --nproc_per_node 4 --log_dir log \\
        ufo_example/train.py -c ufo_example/configs/ufo_tiny_cpu.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from paddle_semoe.engine.launch_env import EXIT_PREEMPTED, run_entry

logger = logging.getLogger(__name__)

__all__ = ["launch_command", "main", "parse_args"]


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max_restart", type=int, default=1, help="relaunches after a failure (default 1)")
    p.add_argument("--nproc_per_node", type=int, required=True)
    p.add_argument("--nproc_schedule", type=str, default=None, help="processes per attempt, e.g. '4,2' (last repeats)")
    p.add_argument("--log_dir", type=str, default="log")
    args, rest = p.parse_known_args(argv)
    if args.max_restart < 0:
        p.error("--max_restart must be >= 0")
    if not rest:
        p.error("missing the training script")
    return args, rest


def _nproc(args: argparse.Namespace, attempt: int) -> int:
    if not args.nproc_schedule:
        return args.nproc_per_node
    sched = [int(x) for x in args.nproc_schedule.split(",") if x.strip()]
    if not sched or min(sched) < 1:
        raise ValueError(f"--nproc_schedule must list positive ints, got {args.nproc_schedule!r}")
    return sched[min(attempt, len(sched) - 1)]


def launch_command(nproc: int, log_dir: str, rest: Sequence[str]) -> list[str]:
    """The ``paddle.distributed.launch`` command of one attempt (the launcher never restarts)."""
    return [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
            "--log_dir", log_dir, "--max_restart", "0", *rest]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [elastic.launch] %(message)s", datefmt="%H:%M:%S")
    args, rest = parse_args(list(sys.argv[1:] if argv is None else argv))
    child: list[subprocess.Popen] = []
    stopped: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopped.append(signum)
        if len(stopped) > 1:  # a second signal: stop waiting for the job to save
            sys.exit(128 + signum)
        logger.warning("%s: forwarding it to the job, waiting for its checkpoint", signal.Signals(signum).name)
        for c in child:
            if c.poll() is None:
                os.killpg(c.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = 1
    attempt = preemptions = 0  # failures use up restarts; preemptions (status 75, checkpoint saved) do not
    while attempt <= args.max_restart:
        nproc = _nproc(args, attempt)
        log_dir = args.log_dir if attempt == 0 else os.path.join(args.log_dir, f"restart{attempt}")
        if preemptions:
            log_dir = os.path.join(log_dir, f"preempted{preemptions}")
        cmd = launch_command(nproc, log_dir, rest)
        env = dict(os.environ, SEMOE_ELASTIC_RESTART=str(attempt))
        logger.info("attempt %d/%d: %d processes: %s", attempt + 1, args.max_restart + 1, nproc, " ".join(cmd))
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        child[:] = [proc]
        rc = proc.wait()
        logger.info("attempt %d ended with status %d after %.1fs", attempt + 1, rc, time.monotonic() - t0)
        if rc == 0:
            return 0
        if stopped:  # the wrapper itself was told to stop: the job has ended, do not relaunch
            return EXIT_PREEMPTED if rc == EXIT_PREEMPTED else 128 + stopped[0]
        if rc == EXIT_PREEMPTED:
            preemptions += 1
            logger.warning("job preempted (status %d): its checkpoint is saved; relaunching from it (no restart used)", rc)
            continue
        if attempt < args.max_restart:
            logger.warning("job failed (status %d): relaunching from the last checkpoint (%d restart(s) left)",
                           rc, args.max_restart - attempt)
        attempt += 1
    logger.error("job failed after %d attempt(s)", args.max_restart + 1)
    return rc


if __name__ == "__main__":
    sys.exit(run_entry(main, name="elastic.launch"))
