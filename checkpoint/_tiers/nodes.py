"""Which ranks make a node, and where each node's replicas go.

A node is the ranks ``rank // ranks_per_node``. Node ``n``'s files are also
kept on nodes ``n+1, ..., n+replicas`` (modulo the node count): a node and its
replicas are always different nodes, and every node holds ``replicas`` other
nodes' files besides its own. A rank sends its files to the rank with the
same local index on each replica node (the last node's rank, modulo its size,
when the job's ranks do not fill every node).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from trainio.storage import CheckpointError

log = logging.getLogger("trainio.checkpoint._manager")


def ranks_per_node(given: int | None, world: int) -> int:
    """The ranks of one node: ``given``, else ``LOCAL_WORLD_SIZE`` (set by torchrun); 1 in a world of one.

    Raises:
        CheckpointError: a multi-rank job with neither, or a value that is not a positive int.
    """
    if given is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            if world == 1:
                return 1
            raise CheckpointError("a node tier in a multi-rank job needs the ranks of one node: set "
                                  "CheckpointManager(..., ranks_per_node=N) or the LOCAL_WORLD_SIZE environment "
                                  "variable (torchrun sets it)")
        try:
            given = int(env)
        except ValueError:
            raise CheckpointError(f"LOCAL_WORLD_SIZE={env!r} is not a number of ranks") from None
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise CheckpointError(f"ranks_per_node must be a positive int, not {given!r}")
    return min(given, world)


@dataclass(frozen=True)
class Nodes:
    """The nodes of a job of ``world`` ranks, ``ranks_per_node`` each, and its replica placement."""

    world: int
    ranks_per_node: int
    replicas: int

    @classmethod
    def of(cls, world: int, per_node: int, replicas: int, label: str) -> Nodes:
        """The nodes of a job; with fewer other nodes than ``replicas``, as many replicas as there are."""
        count = -(-world // per_node)
        if replicas > count - 1:
            if count > 1 or world > 1:
                log.warning("%s: %d replica(s) asked for but the job has %d node(s): keeping %d", label, replicas,
                            count, count - 1)
            replicas = count - 1
        return cls(world, per_node, replicas)

    @property
    def count(self) -> int:
        """How many nodes the job has."""
        return -(-self.world // self.ranks_per_node)

    def node_of(self, rank: int) -> int:
        """The node of ``rank``."""
        return rank // self.ranks_per_node

    def ranks(self, node: int) -> range:
        """The ranks of ``node``."""
        return range(node * self.ranks_per_node, min((node + 1) * self.ranks_per_node, self.world))

    def leader(self, node: int) -> int:
        """The rank that commits and removes steps in ``node``'s directory (its first)."""
        return node * self.ranks_per_node

    def is_leader(self, rank: int) -> bool:
        """Whether ``rank`` is its node's first rank."""
        return rank % self.ranks_per_node == 0

    def replica_nodes(self, node: int) -> list[int]:
        """The nodes that keep copies of ``node``'s files."""
        return [(node + j) % self.count for j in range(1, self.replicas + 1)]

    def replica_targets(self, rank: int) -> list[int]:
        """The ranks ``rank`` sends its files to, one on each replica node."""
        local = rank % self.ranks_per_node
        targets = []
        for node in self.replica_nodes(self.node_of(rank)):
            ranks = self.ranks(node)
            targets.append(ranks[local % len(ranks)])
        return targets

    def replica_sources(self, rank: int) -> list[int]:
        """The ranks whose files ``rank`` keeps copies of."""
        node = self.node_of(rank)
        sources: list[int] = []
        for j in range(1, self.replicas + 1):
            source_node = (node - j) % self.count
            sources.extend(r for r in self.ranks(source_node) if rank in self.replica_targets(r))
        return sources
