"""Bounded waiting for collectives: a watchdog thread and a context-carrying error.

A blocking Gloo (or a host-synchronizing NCCL) call cannot be interrupted from Python. When a
peer dies, Gloo usually fails at once ("Connection reset by peer"), which
:func:`CollectiveWatchdog.guard` turns into a :class:`CommError` naming the collective, the
group and the peer. When a peer hangs instead (alive, never joins), Gloo waits for its own
fixed 30 s timeout and NCCL waits forever; the watchdog thread then logs the same facts and
ends the process with :data:`WATCHDOG_EXIT_CODE` via ``os._exit`` (the only way out of a
blocked C++ call). The launcher then sees a non-zero exit and tears down the job.

The watchdog thread only runs while a guarded call is in flight, and needs the GIL, which
Paddle releases while it waits in a collective (checked on Gloo).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

__all__ = ["WATCHDOG_EXIT_CODE", "CollectiveWatchdog", "CommError"]

#: Exit status of a process ended by the watchdog.
WATCHDOG_EXIT_CODE = 124


class CommError(RuntimeError):
    """A collective failed; the message names the collective, the group and the peer."""


def _default_on_timeout(message: str) -> None:
    logger.critical(message)
    for handler in logging.getLogger().handlers + logger.handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(WATCHDOG_EXIT_CODE)


class CollectiveWatchdog:
    """Ends the process when one guarded collective runs longer than ``timeout_s``.

    Args:
        timeout_s: bound on one collective in seconds; ``None`` or ``<= 0`` disables the
            timer (errors raised by the backend are still wrapped into :class:`CommError`).
        rank: global rank, for messages.
        on_timeout: called with the message when the bound is passed; default: log at
            CRITICAL, flush, ``os._exit(WATCHDOG_EXIT_CODE)``. Tests may pass a recorder.

    Use one watchdog per communicator; it is cheap when idle (one daemon thread, sleeping).
    """

    def __init__(
        self,
        timeout_s: float | None,
        rank: int = 0,
        on_timeout: Callable[[str], None] | None = None,
    ) -> None:
        self.timeout_s = timeout_s if timeout_s is not None and timeout_s > 0 else None
        self.rank = rank
        self._on_timeout = on_timeout or _default_on_timeout
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        self._thread: threading.Thread | None = None
        self._closed = False

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                what, self._deadline = self._what, None
                message = (
                    f"rank {self.rank}: collective watchdog: {what} did not finish within "
                    f"{self.timeout_s:.1f}s; a peer likely died or hangs. Ending this process "
                    f"with exit code {WATCHDOG_EXIT_CODE}."
                )
                self._on_timeout(message)

    @contextlib.contextmanager
    def guard(self, op: str, group: str, peer: str = "any") -> Iterator[None]:
        """Arm the timer around one blocking collective; wrap backend errors in ``CommError``.

        Args:
            op: the collective, e.g. ``"exchange_rows[pairwise send]"``.
            group: ``CommGroup.describe()`` of the group.
            peer: the peer's global rank when one is known, else ``"any"``.
        """
        what = f"{op} on group {group} with peer {peer}"
        if self.timeout_s is not None:
            with self._cond:
                if self._thread is None:  # started at the first guarded call
                    name = f"semoe-comm-watchdog-{self.rank}"
                    self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
                    self._thread.start()
                self._deadline = time.monotonic() + self.timeout_s
                self._what = what
                self._cond.notify()
        try:
            yield
        except CommError:
            raise
        except Exception as exc:  # noqa: BLE001 - backend errors are RuntimeError/OSError/...
            raise CommError(f"rank {self.rank}: {what} failed: {exc}") from exc
        finally:
            if self.timeout_s is not None:
                with self._cond:
                    self._deadline = None
                    self._cond.notify()

    def close(self) -> None:
        """Stop the thread (optional; it is a daemon)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
