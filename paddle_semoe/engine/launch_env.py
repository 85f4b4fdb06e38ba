"""Process set-up shared by the job entry points (tools/*.py, ufo_example/train.py).

Read the launcher's environment (rank, world, local size), pin CPU threads before Paddle is
imported, configure rank-aware logging, load a typed config with one-line errors, and the one
error boundary of every entry point (:func:`run_entry`).

Exit statuses of the entry points:

======  ==================================================================================
0       done
1       an expected failure at run time (I/O error or full disk, a dead peer, a corrupt or
        mismatched checkpoint/package, training stopped): one line on stderr naming the cause
2       bad input (config, command-line value, missing file): one line on stderr
75      preempted (:data:`EXIT_PREEMPTED`): SIGTERM/SIGINT during training, a checkpoint was
        saved; rerun with ``-o train.resume=auto`` to continue exactly
130     interrupted (Ctrl-C outside a training loop): nothing is reported as a failure
other   an unexpected error: its traceback is printed
======  ==================================================================================
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from paddle_semoe.config import ConfigError, load_config
from paddle_semoe.io.files import IntegrityError

T = TypeVar("T")


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_size: int


def launch_env() -> LaunchEnv:
    """This process's place in a ``paddle.distributed.launch`` job (rank 0 of 1 when run plainly)."""
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    return LaunchEnv(
        rank=int(os.environ.get("PADDLE_TRAINER_ID", "0")),
        world_size=world,
        local_size=int(os.environ.get("PADDLE_LOCAL_SIZE", str(world))),
    )


def pin_threads(threads: int | None, env: LaunchEnv) -> int:
    """Set OMP/MKL threads (must run before ``import paddle``); default: cores / local processes."""
    n = threads or max(1, (os.cpu_count() or 1) // max(env.local_size, 1))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    return n


def setup_logging(env: LaunchEnv) -> None:
    """INFO on rank 0, warnings elsewhere; every line carries the rank."""
    logging.basicConfig(
        level=logging.INFO if env.rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def load_job_config(cls: type[T], path: Path | str, overrides: list[str]) -> tuple[T | None, str | None]:
    """``(config, None)``, or ``(None, one-line error)`` for the entry point to print (exit code 2)."""
    try:
        return load_config(cls, path, overrides), None
    except (ConfigError, FileNotFoundError) as err:
        return None, f"error: {err}"


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep large freed blocks instead of returning them to the OS.

    Paddle's CPU allocator frees the step's big activation and gradient buffers and the next
    step allocates them again; by default glibc serves blocks above 128 KiB with fresh mmaps, so
    every step page-faults its whole working set back in (measured: ~52k faults, 70 ms of a
    0.61 s MoE layer step). Raising the mmap and trim thresholds keeps that memory mapped. A
    process-wide setting, so entry points opt in; returns False where glibc is not available.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
        ok &= libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving a checkpoint; resume=auto continues
EXIT_INTERRUPTED = 130

#: Expected run-time failures of modules above this one, named so that checking for them imports
#: nothing (an error can only be of a class whose module is loaded).
_EXPECTED_BY_NAME = (
    ("paddle_semoe.comm.watchdog", "CommError"),
    ("paddle_semoe.engine.checkpoint", "TrainingError"),
    ("paddle_semoe.engine.run_lock", "RunLockError"),
)


def _named_expected() -> tuple[type[BaseException], ...]:
    found = (getattr(sys.modules.get(module), name, None) for module, name in _EXPECTED_BY_NAME)
    return tuple(c for c in found if isinstance(c, type) and issubclass(c, BaseException))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_failure(err: BaseException) -> tuple[int, str] | None:
    """``(exit status, one line naming the cause)`` of an expected failure, else ``None``.

    Expected: bad values (``ValueError``, which config, tokenizer and input errors are), file
    and I/O errors (``OSError``; a full disk says so), corrupt or mismatched checkpoints and
    packages (:class:`~paddle_semoe.io.files.IntegrityError`), a failed collective
    (``CommError``: a dead peer) and a stopped training run (``TrainingError``).
    """
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return EXIT_FAILED, f"disk full ({err.strerror or 'no space left on device'}){where}"
        if isinstance(err, FileNotFoundError):
            return EXIT_USAGE, _one_line(f"{err.strerror}{where}" if err.strerror else str(err))
        return EXIT_FAILED, _one_line(f"I/O error: {err.strerror}{where}" if err.strerror else f"I/O error: {err}")
    if isinstance(err, (IntegrityError, *_named_expected())):
        return EXIT_FAILED, _one_line(str(err)) or type(err).__name__
    if isinstance(err, ValueError):
        return EXIT_USAGE, _one_line(str(err)) or type(err).__name__
    return None


def _say(line: str) -> None:
    """The entry point's own last word on stderr: exactly this line, no logger prefix (users and
    scripts, e.g. tools/chaos.py, read it as the job's result), so not through ``logging``."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_entry(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
              name: str = "semoe") -> int:
    """Run an entry point's ``main(argv)`` inside the error boundary; returns the exit status.

    Expected failures (:func:`describe_failure`) print ``error: <one line>`` on stderr (the
    traceback is logged at DEBUG; ``SEMOE_TRACEBACK=1`` prints it too); unexpected exceptions
    propagate with their traceback. ``KeyboardInterrupt`` is never a failure: it prints
    ``<name>: interrupted`` and returns 130. ``SystemExit`` (argparse) passes through.
    """
    try:
        rc = main(argv)
    except KeyboardInterrupt:
        _say(f"{name}: interrupted")
        return EXIT_INTERRUPTED
    except Exception as err:
        known = describe_failure(err)
        if known is None or os.environ.get("SEMOE_TRACEBACK") == "1":
            raise
        logging.getLogger(name).debug("expected failure", exc_info=True)
        _say(f"error: {known[1]}")
        return known[0]
    return int(rc or 0)
