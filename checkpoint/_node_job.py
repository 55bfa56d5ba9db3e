"""A manager's node tier: the job's nodes, this rank's directory, and promotion and restore through the nodes."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from trainio.storage import CheckpointError, open_store

from ._restore.node_restore import NodeRestore
from ._restore.report import ReadReport
from ._save.collective import Exchange
from ._save.node_promote import promote_part
from ._tier import Tier
from ._tiers.commit import LAST_KNOWN_GOOD, TierIO
from ._tiers.node_holdings import node_groups, settle, uploaders
from ._tiers.node_tier import NodeTierIO
from ._tiers.nodes import Nodes, ranks_per_node
from ._tiers.tier_set import TierSet

log = logging.getLogger("trainio.checkpoint._manager")


class NodeJob:
    """The node tier (the first tier) of a manager, on one rank of the job."""

    def __init__(self, tier: Tier, nodes: Nodes, collective: Exchange) -> None:
        self.tier = tier
        self.nodes = nodes
        self.collective = collective
        self.rank = collective.rank

    @classmethod
    def of(cls, tiers: Sequence[Tier], given_per_node: int | None, collective: Exchange) -> NodeJob | None:
        """The node tier of ``tiers``, or None when there is none.

        Raises:
            ValueError: a node tier that is not the first.
            CheckpointError: a multi-rank job with no ``ranks_per_node`` and no ``LOCAL_WORLD_SIZE``.
        """
        scoped = [i for i, t in enumerate(tiers) if t.node_scoped]
        if not scoped:
            return None
        if scoped != [0]:
            raise ValueError(f"only the first tier may be a node tier (scope='node'); tiers {scoped} are")
        world = collective.world
        nodes = Nodes.of(world, ranks_per_node(given_per_node, world), tiers[0].replicas, tiers[0].label)
        return cls(tiers[0], nodes, collective)

    def open(self) -> NodeTierIO:
        """This rank's node's directory of the tier."""
        node = self.nodes.node_of(self.rank)
        store = open_store(self.tier.node_url(node))
        root = store.local_path(LAST_KNOWN_GOOD)
        assert root is not None, "a node tier is a local directory"
        return NodeTierIO(store, self.tier.label, os.fspath(root.parent), node)

    @property
    def commits(self) -> bool:
        """Whether this rank commits in its node's directory (its node's first rank)."""
        return self.nodes.is_leader(self.rank)

    def settle(self, io: list[TierIO], tierset: TierSet) -> None:
        """Every rank, when the manager opens: make every node agree on its steps (see ``node_holdings.settle``).

        Raises:
            CheckpointError: a rank did not join within the timeout.
        """
        source = io[0]
        assert isinstance(source, NodeTierIO)
        held = source.summaries() if self.commits else {}
        everyone = self.collective.gather("opening the node tier: what each node holds", held)
        verdict = None
        if everyone is not None:
            further: set[int] | None = set()
            try:
                further = {s for tier in io[1:] for s in tier.steps()} if any(everyone) else set()
            except Exception as exc:  # noqa: BLE001 - unknown: then nothing is dropped
                log.warning("%s: cannot list the further tiers, so no node drops a step now: %s", source.label, exc)
                further = None
            verdict = settle(everyone, self.nodes, further)
        verdict = self.collective.broadcast("opening the node tier: the steps every node keeps", verdict)
        if not self.commits:
            return
        drop, roll = [], []
        for step, keep in verdict.items():
            record = held.get(step)
            if record is not None and (keep is None or [record[0], record[2]] != keep):
                drop.append(step)
            elif keep is not None and record is None:
                roll.append((step, keep))
        if not drop and not any(source.is_pending(step, keep[0]) for step, keep in roll):
            return

        def apply() -> None:
            for step in drop:
                source.delete(step)
                why = "another save of it is kept" if verdict[step] is not None else \
                    "no node, replica or further tier holds all of it"
                log.warning("%s: dropped step %d from node %d: %s", source.label, step, source.node, why)
            for step, (run, root) in roll:
                if source.roll_forward(step, run, root):
                    log.warning("%s: committed step %d on node %d, whose commit the job did not finish",
                                source.label, step, source.node)

        try:
            tierset.hold(0, before_cleaning=apply)  # a directory to roll forward is a dead writer's until then
        except CheckpointError as exc:
            log.warning("%s: cannot settle node %d's steps %s: %s", source.label, source.node, drop, exc)

    def promote(self, io: list[TierIO], tierset: TierSet, pool: ThreadPoolExecutor, threads: int) -> None:
        """Every rank: upload the parts rank 0 gives it of each step a further tier wants (``node_promote.py``).

        Rank 0 gives each part to its own node's rank, or where that node's
        copy is gone, to a node keeping its replica (``node_holdings.uploaders``).
        """
        source = io[0]
        assert isinstance(source, NodeTierIO)
        try:
            held = source.summaries() if self.commits else {}
            everyone = self.collective.gather("promotion: what each node holds", held, background="promote")
            plan = self._promotion_plan(tierset, everyone) if everyone is not None else None
            plan = self.collective.broadcast("promotion: the steps the further tiers want", plan,
                                             background="promote")
        except CheckpointError as exc:
            log.error("promotion from the node tier: %s", exc)
            return
        failed: set[int] = set()
        for step, target, name, by_rank, root_rank in plan:
            if target in failed:
                continue  # every rank knows: the failure was broadcast
            previous = tierset.previous(target, step)
            try:
                nbytes = promote_part(self.collective, source, io[target], step, name, previous, pool, threads,
                                      by_rank.get(self.rank, []), self.rank == root_rank)
            except CheckpointError as exc:
                failed.add(target)
                if self.rank == 0:
                    tierset.promotion_failed(target, step, exc)
                continue
            if self.rank == 0:
                tierset.promoted(target, step, nbytes)
        if self.rank == 0:
            tierset.settle_promotions(failed)

    def _promotion_plan(self, tierset: TierSet, held: list[dict[int, list[Any]]]) -> list[tuple[Any, ...]]:
        """Rank 0: each (step, further tier, writers' name, uploads by rank, rank uploading the root's files)."""
        groups = node_groups(held, self.nodes)
        plan = []
        for step, target, name in tierset.from_nodes(set(groups)):
            who = uploaders(groups.get(step), self.nodes)
            if isinstance(who, str):
                tierset.promotion_failed(target, step, CheckpointError(who))
                continue
            plan.append((step, target, name, *who))
        return plan

    def restore(self, io: list[TierIO], chosen: list[int], step: int | None, keys: list[str] | None, into: Any,
                tierset: TierSet, pool: ThreadPoolExecutor, threads: int) -> tuple[Any, ReadReport]:
        """Every rank: restore through the nodes and the chosen further tiers (see ``node_restore.py``)."""
        further = [io[i] for i in chosen if i]

        def further_steps() -> dict[int, list[str]]:
            held: dict[int, list[str]] = {}
            for tier in further:
                for s in tier.steps():
                    held.setdefault(s, []).append(tier.label)
            return held

        source = io[0]
        assert isinstance(source, NodeTierIO)
        restore = NodeRestore(self.collective, self.nodes, source, further, pool, threads, lambda: tierset.hold(0))
        return restore.restore(step, keys, into, further_steps, self.collective.world)
