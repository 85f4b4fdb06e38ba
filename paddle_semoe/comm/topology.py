"""Process groups of an expert-parallel job: which ranks talk to which.

World of ``W = ep_degree * expert_dp_degree`` ranks; every rank holds different data.
Rank ``r`` sits in EP group ``g = r // ep`` at EP rank ``r % ep``.

* ``ep_group``: ranks ``[g*ep, (g+1)*ep)``; they exchange tokens and together hold all E
  experts.
* ``expert_dp_group``: ranks ``{r % ep + k*ep}``, the same EP rank in every EP group:
  replicas of the same experts (data parallel for expert parameters).
* ``dp_group``: all ranks; dense and gate parameters are replicated there.
* ``sharding_group`` (optional): consecutive blocks of ``sharding_degree`` ranks (Fleet's
  axis order ``data, pipe, sharding`` with mp = pp = 1 puts sharding innermost).
* ``intra_node_group``: the ranks of ``r``'s node inside its EP group (a node is
  ``ranks_per_node`` consecutive ranks); step 1 of the hierarchical all-to-all.
* ``inter_node_group``: the ranks of the EP group with ``r``'s local rank, one per node (a
  "rail"); step 2 of the hierarchical all-to-all.

Nodes must tile EP groups: ``ranks_per_node`` divides ``ep`` (an EP group spans whole nodes)
or ``ep`` divides ``ranks_per_node`` (EP groups live inside a node; the inter-node group is
then the rank alone and the hierarchical exchange degenerates to the flat one).

The rank arithmetic lives in :func:`group_rank_lists` (pure Python, tested without
processes); :func:`build_topology` turns it into Paddle groups with
``paddle.distributed.new_group``, :func:`topology_from_fleet` reuses Fleet's groups where
Fleet has them, and :meth:`Topology.single` describes one process without any group.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

logger = logging.getLogger(__name__)

__all__ = [
    "GROUP_KINDS",
    "CommGroup",
    "Topology",
    "build_topology",
    "default_ranks_per_node",
    "group_rank_lists",
    "topology_from_fleet",
    "validate_degrees",
]

#: Group kinds in the order in which every rank creates them (``new_group`` is collective).
GROUP_KINDS: tuple[str, ...] = ("ep", "expert_dp", "dp", "intra_node", "inter_node", "sharding")


@dataclass(frozen=True)
class CommGroup:
    """One process group as seen from one rank.

    Attributes:
        name: the group kind (``"ep"``, ``"dp"``, ...), used in logs and errors.
        ranks: global ranks of the members, ascending; member ``i`` has group rank ``i``.
        rank_in_group: this process's index in ``ranks``.
        handle: the backend object: a ``paddle.distributed.communication.group.Group``
            for real runs, ``None`` for a one-rank group or a simulated world (the simulated
            communicator addresses groups by ``ranks``).
    """

    name: str
    ranks: tuple[int, ...]
    rank_in_group: int
    handle: Any = None

    def __post_init__(self) -> None:
        if not self.ranks:
            raise ValueError(f"group {self.name!r} has no ranks")
        if list(self.ranks) != sorted(set(self.ranks)):
            raise ValueError(f"group {self.name!r} ranks must be ascending and unique, got {self.ranks}")
        if not 0 <= self.rank_in_group < len(self.ranks):
            raise ValueError(
                f"group {self.name!r}: rank_in_group={self.rank_in_group} outside [0, {len(self.ranks)})"
            )

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def global_rank(self) -> int:
        """Global rank of this process."""
        return self.ranks[self.rank_in_group]

    def describe(self) -> str:
        """Short text for logs: ``ep[ranks 0,1,2,3]``."""
        return f"{self.name}[ranks {','.join(map(str, self.ranks))}]"

    @staticmethod
    def solo(name: str, rank: int = 0) -> "CommGroup":
        """A group holding only ``rank`` (no communication ever happens in it)."""
        return CommGroup(name=name, ranks=(rank,), rank_in_group=0, handle=None)


def validate_degrees(
    world_size: int, ep_degree: int, ranks_per_node: int, sharding_degree: int = 1
) -> None:
    """Check that the degrees describe a valid layout; ``ValueError`` names the problem."""
    degrees = {"world_size": world_size, "ep_degree": ep_degree, "ranks_per_node": ranks_per_node,
               "sharding_degree": sharding_degree}
    for key, value in degrees.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    if world_size % ep_degree:
        raise ValueError(
            f"ep_degree={ep_degree} does not divide world_size={world_size}: "
            f"ep_degree * expert_dp_degree must equal the world size"
        )
    if world_size % ranks_per_node:
        raise ValueError(f"ranks_per_node={ranks_per_node} does not divide world_size={world_size}")
    if ep_degree % ranks_per_node and ranks_per_node % ep_degree:
        raise ValueError(
            f"ranks_per_node={ranks_per_node} and ep_degree={ep_degree}: nodes must tile EP groups "
            f"(ranks_per_node must divide ep_degree, or ep_degree divide ranks_per_node)"
        )
    if world_size % sharding_degree:
        raise ValueError(f"sharding_degree={sharding_degree} does not divide world_size={world_size}")


def group_rank_lists(
    world_size: int, ep_degree: int, ranks_per_node: int, sharding_degree: int = 1
) -> dict[str, list[tuple[int, ...]]]:
    """Every group of every kind, as ascending tuples of global ranks.

    Returns ``{kind: [ranks of group 0, ranks of group 1, ...]}`` for each kind in
    :data:`GROUP_KINDS`; each rank belongs to exactly one group of each kind.
    """
    validate_degrees(world_size, ep_degree, ranks_per_node, sharding_degree)
    W, P = world_size, ep_degree
    L = min(ranks_per_node, P)  # ranks of one node inside one EP group
    n_nodes = P // L  # nodes spanned by one EP group
    lists: dict[str, list[tuple[int, ...]]] = {k: [] for k in GROUP_KINDS}
    for g in range(W // P):
        lists["ep"].append(tuple(range(g * P, (g + 1) * P)))
        for n in range(n_nodes):
            lists["intra_node"].append(tuple(g * P + n * L + j for j in range(L)))
        for j in range(L):
            lists["inter_node"].append(tuple(g * P + m * L + j for m in range(n_nodes)))
    for i in range(P):
        lists["expert_dp"].append(tuple(range(i, W, P)))
    lists["dp"].append(tuple(range(W)))
    for b in range(W // sharding_degree):
        lists["sharding"].append(tuple(range(b * sharding_degree, (b + 1) * sharding_degree)))
    return lists


def default_ranks_per_node(world_size: int) -> int:
    """Ranks per node from the launcher (``PADDLE_LOCAL_SIZE``), else the whole world."""
    value = os.environ.get("PADDLE_LOCAL_SIZE")
    if value is None:
        return world_size
    try:
        n = int(value)
    except ValueError as exc:
        raise ValueError(f"PADDLE_LOCAL_SIZE={value!r} is not an int") from exc
    return n if n >= 1 else world_size


@dataclass(frozen=True)
class Topology:
    """Process groups of one rank in an expert-parallel job (see the module docstring).

    Attributes:
        world_size: W.
        rank: this process's global rank.
        ep_degree: ranks per EP group (P); experts are split over them.
        ranks_per_node: node size used by the hierarchical exchange.
        ep_group, expert_dp_group, dp_group, intra_node_group, inter_node_group: groups
            containing this rank.
        sharding_group: optional ZeRO sharding group (``None`` when not sharded).
    """

    world_size: int
    rank: int
    ep_degree: int
    ranks_per_node: int
    ep_group: CommGroup
    expert_dp_group: CommGroup
    dp_group: CommGroup
    intra_node_group: CommGroup
    inter_node_group: CommGroup
    sharding_group: CommGroup | None = None

    def __post_init__(self) -> None:
        sharding = self.sharding_group.size if self.sharding_group is not None else 1
        expected = group_rank_lists(self.world_size, self.ep_degree, self.ranks_per_node, sharding)
        for kind, group in self.groups():
            mine = [r for r in expected[kind] if self.rank in r]
            if group.global_rank != self.rank or tuple(group.ranks) != mine[0]:
                raise ValueError(
                    f"{kind} group {group.describe()} of rank {self.rank} does not match the "
                    f"layout for world_size={self.world_size}, ep_degree={self.ep_degree}, "
                    f"ranks_per_node={self.ranks_per_node}: expected ranks {mine[0]}"
                )

    @property
    def expert_dp_degree(self) -> int:
        """Replicas of each expert: ``W / ep_degree``."""
        return self.world_size // self.ep_degree

    @property
    def ep_rank(self) -> int:
        """This rank's index in its EP group (it owns experts ``[ep_rank*El, (ep_rank+1)*El)``)."""
        return self.ep_group.rank_in_group

    @property
    def gate_group(self) -> CommGroup:
        """Where gate gradients are averaged: gate parameters are replicated on every rank.

        ``dp_group`` when ``expert_dp_degree > 1``; else ``ep_group``, which then holds the
        same ranks (all of them), so the rule is simply "all ranks".
        """
        return self.dp_group if self.expert_dp_degree > 1 else self.ep_group

    @staticmethod
    def single() -> "Topology":
        """One process, no groups, no communication."""
        return Topology.from_handles(1, 0, 1, 1, {})

    @staticmethod
    def from_handles(
        world_size: int,
        rank: int,
        ep_degree: int,
        ranks_per_node: int,
        handles: Mapping[tuple[int, ...], Any],
        sharding_degree: int = 1,
    ) -> "Topology":
        """Assemble a topology from backend handles keyed by rank tuple (``None`` allowed)."""
        lists = group_rank_lists(world_size, ep_degree, ranks_per_node, sharding_degree)
        mine: dict[str, Any] = {}
        for kind in GROUP_KINDS:
            ranks = next(r for r in lists[kind] if rank in r)
            mine[f"{kind}_group"] = CommGroup(kind, ranks, ranks.index(rank), handles.get(ranks))
        if sharding_degree == 1:
            mine["sharding_group"] = None
        return Topology(world_size, rank, ep_degree, ranks_per_node, **mine)

    def groups(self) -> list[tuple[str, CommGroup]]:
        """``(kind, group)`` of every group of this rank, in :data:`GROUP_KINDS` order."""
        pairs = [(kind, getattr(self, f"{kind}_group")) for kind in GROUP_KINDS]
        return [(kind, g) for kind, g in pairs if g is not None]

    def describe(self) -> str:
        head = (
            f"W={self.world_size} rank={self.rank} ep={self.ep_degree} "
            f"expert_dp={self.expert_dp_degree} ranks_per_node={self.ranks_per_node}"
        )
        return " ".join([head] + [g.describe() for _, g in self.groups()])


def _new_groups(
    lists: dict[str, list[tuple[int, ...]]],
    existing: Mapping[tuple[int, ...], Any] | None = None,
) -> dict[tuple[int, ...], Any]:
    """Create one Paddle group per distinct rank tuple, identically ordered on every rank.

    ``paddle.distributed.new_group`` is collective over the whole world: every rank calls it
    for every group in the same order (including groups it is not in). One-rank groups need
    no handle; rank tuples already in ``existing`` are reused. On Gloo each group gets a
    private rendezvous store (:class:`~paddle_semoe.comm.gloo_groups.GlooGroupFactory`:
    Paddle's own creation hangs or fails for overlapping groups).
    """
    from paddle_semoe.comm.gloo_groups import GlooGroupFactory

    factory = GlooGroupFactory()
    handles: dict[tuple[int, ...], Any] = dict(existing or {})
    for ranks in (r for kind in GROUP_KINDS for r in lists[kind]):
        if len(ranks) > 1 and ranks not in handles:
            handles[ranks] = factory.new_group(ranks)
    return handles


def build_topology(
    ep_degree: int,
    *,
    ranks_per_node: int | None = None,
    sharding_degree: int = 1,
) -> Topology:
    """Create all groups with ``paddle.distributed.new_group`` (collective: call on every rank).

    Args:
        ep_degree: ranks per EP group; ``expert_dp_degree = W / ep_degree``.
        ranks_per_node: node size for the hierarchical exchange; default: the launcher's
            local world size (``PADDLE_LOCAL_SIZE``), else ``W``. On CPU, pass e.g. 2 with 4
            processes to emulate 2 nodes x 2.
        sharding_degree: size of the optional sharding group (1: none).

    ``paddle.distributed.init_parallel_env()`` must have run when ``W > 1``.
    """
    import paddle.distributed as dist

    world = dist.get_world_size()
    rank = dist.get_rank()
    if world == 1:
        if ep_degree != 1:
            raise ValueError(f"ep_degree={ep_degree} with a world of one process")
        return Topology.single()
    rpn = default_ranks_per_node(world) if ranks_per_node is None else ranks_per_node
    lists = group_rank_lists(world, ep_degree, rpn, sharding_degree)
    handles = _new_groups(lists)
    topo = Topology.from_handles(world, rank, ep_degree, rpn, handles, sharding_degree)
    logger.info("topology: %s", topo.describe())
    return topo


def topology_from_fleet(
    ep_degree: int,
    *,
    hcg: Any = None,
    ranks_per_node: int | None = None,
) -> Topology:
    """Build the topology on top of an initialized Fleet (collective: call on every rank).

    Mapping (mp = pp = 1 is required; Fleet orders axes ``data, pipe, sharding, sep, model``):

    * ``dp_group``: Fleet's data-parallel group when it spans the world, else a new group of
      all ranks (with sharding, Fleet's data group is only ``W / sharding_degree`` ranks).
    * ``sharding_group``: Fleet's sharding group when ``sharding_degree > 1``.
    * ``ep_group``: Fleet's ``expert`` group when Fleet was initialized with an expert axis
      (``EPHybridCommunicateGroup``, ``ep_degree`` in hybrid_configs) and it matches the
      consecutive layout; otherwise a new group (plain Fleet has no EP axis).
    * ``expert_dp_group``: Fleet's ``moe_sharding`` group when it matches (ranks holding the
      same experts), otherwise a new group.
    * ``intra_node_group`` / ``inter_node_group``: always new groups (Fleet has none).

    Raises ``ValueError`` when Fleet's layout contradicts the consecutive EP layout.
    """
    import paddle.distributed as dist

    if hcg is None:
        from paddle.distributed import fleet

        hcg = fleet.get_hybrid_communicate_group()
    world = dist.get_world_size()
    rank = dist.get_rank()
    mp = hcg.get_model_parallel_world_size()
    pp = hcg.get_pipe_parallel_world_size()
    if mp != 1 or pp != 1:
        raise ValueError(f"topology_from_fleet supports mp_degree=pp_degree=1, got mp={mp} pp={pp}")
    sharding_degree = hcg.get_sharding_parallel_world_size()
    rpn = default_ranks_per_node(world) if ranks_per_node is None else ranks_per_node
    lists = group_rank_lists(world, ep_degree, rpn, sharding_degree)

    existing: dict[tuple[int, ...], Any] = {}

    def adopt(kind: str, group: Any) -> None:
        if group is None:
            return
        ranks = tuple(group.ranks)
        if len(ranks) > 1 and ranks in lists[kind]:
            existing[ranks] = group
        elif len(ranks) > 1 and kind in ("ep", "expert_dp"):
            raise ValueError(
                f"Fleet's {kind} group has ranks {ranks}, which is not a {kind} group of the "
                f"consecutive layout {lists[kind]} (ep_degree={ep_degree})"
            )

    adopt("dp", hcg.get_data_parallel_group())
    if sharding_degree > 1:
        adopt("sharding", hcg.get_sharding_parallel_group())
    if hasattr(hcg, "get_expert_parallel_group"):
        adopt("ep", hcg.get_expert_parallel_group())
        if hasattr(hcg, "get_moe_sharding_parallel_group"):
            adopt("expert_dp", hcg.get_moe_sharding_parallel_group())
    # Groups Fleet already made are known on every rank only for the rank's own group, but
    # the decision "Fleet has this kind" is the same everywhere, so the creation order of the
    # remaining groups is identical on all ranks.
    handles = dict(existing)
    for kind in GROUP_KINDS:
        if any(r in existing for r in lists[kind]):
            handles.update({r: existing.get(r) for r in lists[kind]})
    handles = _new_groups(lists, existing=handles)
    for kind in GROUP_KINDS:
        own = next(r for r in lists[kind] if rank in r)
        if len(own) > 1 and handles.get(own) is None and (kind != "sharding" or sharding_degree > 1):
            raise ValueError(f"Fleet made {kind} groups but none with ranks {own} for rank {rank}")
    topo = Topology.from_handles(world, rank, ep_degree, rpn, handles, sharding_degree)
    logger.info("topology (from fleet): %s", topo.describe())
    return topo
