"""Reliable creation of Paddle Gloo process groups (a workaround for a Paddle 3.3 bug).

The bug: ``ProcessGroupGloo``'s constructor runs Gloo's ``connectFullMesh`` on the job's
default TCP store *without a key prefix* (keys ``"0"``, ``"1"``, ... = rank in the group;
Paddle's ``GlooStore`` wraps the store as is). Every group creation therefore finds the keys
that earlier groups wrote, and a member that reads a peer's key before the peer rewrote it
connects to a stale listener: it hangs in the rendezvous or fails with "Connection refused".
Measured here: 4 processes creating (0,1), (2,3), (0,2), (1,3) hang or fail (with or
without a barrier between creations), and ``fleet.init`` with ``dp_degree=2,
sharding_degree=2`` on 4 processes failed 3 runs out of 3 with "Connection refused". With 2
processes it is a timing race that usually goes well.

The fix: for each group its first member starts a fresh ``TCPStore`` (free port, published on
the default store under a key unique to this factory and group) and ``new_group`` runs with
that store as Paddle's default store for the duration of the call (Paddle reads the module
attribute ``paddle.distributed.collective._default_store``). Non-members call ``new_group``
as usual (it is collective over the world, which keeps group ids in step). NCCL groups need
none of this and are created unchanged.

* :class:`GlooGroupFactory` is what :func:`~paddle_semoe.comm.topology.build_topology` uses.
* :func:`gloo_private_rendezvous` applies the same fix to code we do not own, e.g.
  ``with gloo_private_rendezvous(): fleet.init(is_collective=True, strategy=s)``: inside the
  block ``paddle.distributed.new_group`` goes through a factory; the original is restored on
  exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any, Callable, Iterator

import paddle.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["GlooGroupFactory", "gloo_private_rendezvous"]

_STORE_TIMEOUT_S = 900


def _is_gloo() -> bool:
    return "gloo" in str(dist.get_backend()).lower()


def _host_of(rank: int) -> str:
    endpoints = os.environ.get("PADDLE_TRAINER_ENDPOINTS", "").split(",")
    if rank < len(endpoints) and ":" in endpoints[rank]:
        return endpoints[rank].rsplit(":", 1)[0]
    return "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


class GlooGroupFactory:
    """Creates Paddle groups; Gloo groups rendezvous through a private TCP store each.

    Construction is collective over the world (one counter increment and a barrier, to
    agree on a namespace); so is every :meth:`new_group` call, like ``new_group`` itself.

    Args:
        new_group: the function that really creates a group (default
            ``paddle.distributed.new_group``; :func:`gloo_private_rendezvous` passes the
            original while it patches the module attribute).
    """

    def __init__(self, new_group: Callable[..., Any] | None = None) -> None:
        self._new_group = new_group or dist.new_group
        self._rank = dist.get_rank()
        self._private = _is_gloo()
        self._store: Any = None
        self._collective: Any = None
        self._namespace = 0
        self._index = 0
        if self._private:
            try:
                from paddle.distributed import collective

                self._collective = collective
                self._store = collective._default_store
                if self._store is None or not hasattr(collective, "_set_default_store"):
                    raise AttributeError("paddle.distributed.collective has no default store")
            except (ImportError, AttributeError) as exc:  # a Paddle without these internals
                logger.warning("Gloo groups without private rendezvous stores (%s): creation may hang", exc)
                self._private = False
        if self._private:
            # a namespace equal on all ranks: every rank adds 1, then a barrier
            value = int(self._store.add("semoe/gloo_groups/factories", 1))
            dist.barrier()
            self._namespace = (value - 1) // dist.get_world_size()

    def new_group(self, ranks: list[int] | tuple[int, ...] | None = None, **kwargs: Any) -> Any:
        """``paddle.distributed.new_group(ranks, **kwargs)`` with a private Gloo rendezvous."""
        key = f"semoe/gloo_groups/{self._namespace}/{self._index}"
        self._index += 1
        members = sorted(ranks) if ranks is not None else list(range(dist.get_world_size()))
        if not self._private or self._rank not in members or len(members) < 2:
            return self._new_group(ranks if ranks is None else list(ranks), **kwargs)
        from paddle.base import core

        is_master = self._rank == members[0]
        if is_master:
            port = _free_port()
            self._store.set(key, str(port))
        else:
            self._store.wait(key)
            port = int(bytes(self._store.get(key)).decode())
        store = core.TCPStore(_host_of(members[0]), port, is_master, len(members), _STORE_TIMEOUT_S)
        saved = self._collective._default_store
        self._collective._set_default_store(store)
        try:
            return self._new_group(list(ranks) if ranks is not None else None, **kwargs)
        finally:
            self._collective._set_default_store(saved)


@contextlib.contextmanager
def gloo_private_rendezvous() -> Iterator[None]:
    """Inside the block, ``paddle.distributed.new_group`` uses :class:`GlooGroupFactory`.

    Meant for third-party group creation such as ``fleet.init``; the factory is created at
    the first ``new_group`` call (after Fleet has initialized the parallel environment).
    A no-op for NCCL. Not thread-safe (it swaps module attributes of Paddle for the block).
    """
    from paddle.distributed import collective

    original = dist.new_group
    factory: list[GlooGroupFactory] = []

    def new_group(ranks: Any = None, *args: Any, **kwargs: Any) -> Any:
        kwargs.update(zip(("backend", "timeout", "nccl_comm_init_option", "nccl_config"), args))
        if not factory:
            factory.append(GlooGroupFactory(new_group=original))
        return factory[0].new_group(ranks, **kwargs)

    dist.new_group = new_group
    collective_original = getattr(collective, "new_group", None)
    collective.new_group = new_group
    try:
        yield
    finally:
        dist.new_group = original
        if collective_original is not None:
            collective.new_group = collective_original
