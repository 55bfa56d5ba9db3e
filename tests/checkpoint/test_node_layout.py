"""Node tiers without processes: which ranks make a node, replica placement, settling, who promotes what."""

from __future__ import annotations

from typing import Any

import pytest

from trainio.checkpoint._tiers.node_holdings import node_groups, settle, uploaders
from trainio.checkpoint._tiers.nodes import Nodes, ranks_per_node
from trainio.storage import CheckpointError


@pytest.mark.parametrize(("world", "per_node", "replicas"), [(8, 2, 1), (8, 2, 3), (7, 2, 2), (9, 4, 1), (6, 1, 2)])
def test_replicas_go_to_other_nodes_and_every_target_knows_its_sources(world: int, per_node: int,
                                                                       replicas: int) -> None:
    nodes = Nodes.of(world, per_node, replicas, "t")
    for rank in range(world):
        targets = nodes.replica_targets(rank)
        assert len(targets) == replicas
        homes = {nodes.node_of(t) for t in targets}
        assert nodes.node_of(rank) not in homes and len(homes) == replicas  # each copy on another node
        for target in targets:
            assert rank in nodes.replica_sources(target)
    for target in range(world):
        assert all(target in nodes.replica_targets(s) for s in nodes.replica_sources(target))


def test_more_replicas_than_other_nodes_keeps_as_many_as_there_are() -> None:
    assert Nodes.of(4, 2, 5, "t").replicas == 1
    assert Nodes.of(1, 1, 1, "t").replicas == 0


def test_ranks_per_node_comes_from_the_argument_or_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert ranks_per_node(None, 1) == 1
    with pytest.raises(CheckpointError, match="ranks_per_node=N.*LOCAL_WORLD_SIZE"):
        ranks_per_node(None, 8)
    assert ranks_per_node(4, 8) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert ranks_per_node(None, 8) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(CheckpointError, match="LOCAL_WORLD_SIZE='two'"):
        ranks_per_node(None, 8)


def _held(per_node: dict[int, dict[int, list[Any]]], world: int = 8, rpn: int = 2) -> list[dict[int, list[Any]]]:
    """Reports as rank 0 gathers them: each node's first rank reports its node's steps."""
    return [per_node.get(rank // rpn, {}) if rank % rpn == 0 else {} for rank in range(world)]


def _record(parts: list[int], root_files: bool = False, run: str = "run-a", world: int = 8) -> list[Any]:
    return [run, 100, "ab" * 16, parts, root_files, 8, world]


def test_settling_keeps_whole_steps_and_drops_what_can_never_be_restored() -> None:
    nodes = Nodes.of(8, 2, 1, "t")
    held = _held({0: {5: _record([0, 1, 6, 7], True), 6: _record([0, 1, 6, 7], True),
                      7: _record([0, 1], True, world=4)},
                  1: {5: _record([2, 3, 0, 1], True), 6: _record([2, 3, 0, 1], True)},
                  2: {5: _record([4, 5, 2, 3]), 6: _record([4, 5, 2, 3], run="run-b")},
                  3: {6: _record([6, 7, 4, 5])}})
    verdict = settle(held, nodes, further=set())
    assert verdict[5] == ["run-a", "ab" * 16]  # every part on some node: kept, node 3 fills in later
    assert verdict[6] == ["run-a", "ab" * 16]  # whole; node 2's record of another save is dropped
    assert 7 not in verdict  # another world size saved it: left alone
    del held[4][5]  # node 2 lost step 5: parts 4 and 5 are on no node
    assert settle(held, nodes, further=set())[5] is None
    assert settle(held, nodes, further={5})[5] is not None  # a further tier has it: the node copies stay
    assert settle(held, nodes, further=None)[5] is not None  # the further tiers are unknown: nothing dropped


def test_a_lost_nodes_part_is_promoted_by_its_replica_holder() -> None:
    nodes = Nodes.of(8, 2, 1, "t")
    held = _held({0: {3: _record([0, 1, 6, 7], True)}, 2: {3: _record([4, 5, 2, 3])},
                  3: {3: _record([6, 7, 4, 5])}})  # node 1 is gone; node 2 keeps its replica
    by_rank, root_rank = uploaders(node_groups(held, nodes)[3], nodes)
    assert by_rank == {0: [0], 1: [1], 4: [2, 4], 5: [3, 5], 6: [6], 7: [7]}
    assert root_rank == 0
    del held[6][3]  # node 3 gone too: node 0 uploads the replicas of parts 6 and 7
    assert uploaders(node_groups(held, nodes)[3], nodes) == ({0: [0, 6], 1: [1, 7], 4: [2, 4], 5: [3, 5]}, 0)
    del held[4][3]  # and node 2: parts 4 and 5, and the replicas of 2 and 3, are on no node
    assert "parts of ranks [2, 3, 4, 5]" in str(uploaders(node_groups(held, nodes)[3], nodes))
