"""Rank layout of the process groups (no processes needed)."""

from __future__ import annotations

import pytest

from paddle_semoe.comm.topology import CommGroup, Topology, group_rank_lists, validate_degrees


def test_group_lists_two_nodes_of_two_one_ep_group() -> None:
    g = group_rank_lists(world_size=4, ep_degree=4, ranks_per_node=2)
    assert g["ep"] == [(0, 1, 2, 3)]
    assert g["expert_dp"] == [(0,), (1,), (2,), (3,)]
    assert g["dp"] == [(0, 1, 2, 3)]
    assert g["intra_node"] == [(0, 1), (2, 3)]
    assert g["inter_node"] == [(0, 2), (1, 3)]
    assert g["sharding"] == [(0,), (1,), (2,), (3,)]


def test_group_lists_ep_with_replicas() -> None:
    g = group_rank_lists(world_size=8, ep_degree=4, ranks_per_node=2, sharding_degree=2)
    assert g["ep"] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert g["expert_dp"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert g["intra_node"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert g["inter_node"] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert g["sharding"] == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_group_lists_ep_inside_a_node() -> None:
    g = group_rank_lists(world_size=4, ep_degree=2, ranks_per_node=4)
    assert g["ep"] == [(0, 1), (2, 3)]
    assert g["intra_node"] == [(0, 1), (2, 3)]  # the whole EP group sits in one node
    assert g["inter_node"] == [(0,), (1,), (2,), (3,)]


def test_every_rank_in_exactly_one_group_of_each_kind() -> None:
    for W, ep, rpn in [(8, 4, 2), (8, 8, 4), (6, 3, 3), (12, 6, 2), (8, 2, 8)]:
        lists = group_rank_lists(W, ep, rpn)
        for kind, groups in lists.items():
            flat = sorted(r for grp in groups for r in grp)
            assert flat == list(range(W)), (kind, W, ep, rpn)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(world_size=6, ep_degree=4, ranks_per_node=2), "ep_degree=4 does not divide world_size=6"),
        (dict(world_size=8, ep_degree=4, ranks_per_node=3), "ranks_per_node=3 does not divide"),
        (dict(world_size=12, ep_degree=4, ranks_per_node=6), "nodes must tile EP groups"),
        (dict(world_size=4, ep_degree=0, ranks_per_node=2), "ep_degree must be a positive int"),
        (dict(world_size=4, ep_degree=2, ranks_per_node=2, sharding_degree=3), "sharding_degree=3"),
    ],
)
def test_validation_names_the_problem(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_degrees(**kwargs)


def test_single() -> None:
    t = Topology.single()
    assert t.world_size == 1 and t.ep_degree == 1 and t.expert_dp_degree == 1
    assert t.ep_rank == 0
    assert t.gate_group.size == 1 and t.sharding_group is None


def test_from_handles_and_gate_rule() -> None:
    t = Topology.from_handles(8, rank=5, ep_degree=4, ranks_per_node=2, handles={})
    assert t.ep_group.ranks == (4, 5, 6, 7) and t.ep_rank == 1
    assert t.expert_dp_group.ranks == (1, 5) and t.expert_dp_degree == 2
    assert t.intra_node_group.ranks == (4, 5) and t.inter_node_group.ranks == (5, 7)
    assert t.gate_group is t.dp_group  # replicas exist: gate reduced over all ranks
    t1 = Topology.from_handles(4, rank=2, ep_degree=4, ranks_per_node=2, handles={})
    assert t1.gate_group is t1.ep_group and t1.ep_group.ranks == t1.dp_group.ranks


def test_topology_rejects_a_wrong_group() -> None:
    good = Topology.from_handles(4, rank=1, ep_degree=2, ranks_per_node=2, handles={})
    with pytest.raises(ValueError, match="ep group .* does not match the layout"):
        Topology(
            world_size=4,
            rank=1,
            ep_degree=2,
            ranks_per_node=2,
            ep_group=CommGroup("ep", (1, 2), 0),
            expert_dp_group=good.expert_dp_group,
            dp_group=good.dp_group,
            intra_node_group=good.intra_node_group,
            inter_node_group=good.inter_node_group,
        )


def test_comm_group_checks() -> None:
    with pytest.raises(ValueError, match="ascending"):
        CommGroup("ep", (2, 1), 0)
    with pytest.raises(ValueError, match="rank_in_group"):
        CommGroup("ep", (0, 1), 2)
    assert CommGroup("ep", (3, 5), 1).global_rank == 5
