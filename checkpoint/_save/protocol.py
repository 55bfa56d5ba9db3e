"""The save of a step, by any number of ranks: agree on a plan, each rank writes its share, rank 0 commits.

A single process saves as a world of one, through the same planning,
writing and commit code (its exchanges are local: :class:`WorldOfOne`).

Agreeing on the plan takes two small exchanges in ``save()``, whatever the
rank count: every rank sends rank 0 digests (gather), and rank 0 sends every
rank its decision (broadcast). The digests are of the rank's layout as the
rule of ``share_plan.py`` describes it (paths, types, shapes, meshes and
placements: the same on every rank), of its boxes, of its replicated arrays'
live bytes (xxh3-128 of each, in a world of more than one) and of its
skeleton's shared part (JSON leaves included); with them go its own
:class:`~trainio.checkpoint.PerRank` sub-trees and rows. Where every rank
sent the same layout and bytes (the common case), each rank then plans its
own share alone (:func:`share_plan`, reused while nothing changed). Otherwise
(a DTensor on a mesh that is not the whole job; replicated bytes that
differ) the ranks exchange their boxes (all_gather), every rank makes the
whole plan (:func:`make_plan`, reused while the boxes are the last ones) and
names what differs; where the skeletons differ, they exchange those too, to
name the first difference. Every rank raises alike. Then, in the background:

1. every rank writes the files of its boxes (rank 0 also the pack and the
   metadata documents) into its writer for the step, then its part manifest
   (its files' sizes and digests), makes them durable and checks they are in
   place;
2. every rank reports its part's size and digest to rank 0 (gather), rank 0
   also its own files: never every file of the step;
3. rank 0 checks that every rank succeeded, builds the root manifest, and
   commits it (:meth:`StepWriter.commit`: lease, its files and every part
   checked, root last), or aborts the step;
4. rank 0 tells every rank the outcome (broadcast): the step's totals, or the
   error.

On a node tier, step 1 also sends every rank's files to its replica nodes,
and in step 3 rank 0 checks the replicas and, instead of committing, sends
the root manifest to every node, whose first rank commits there
(``node_commit.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from trainio.storage import CheckpointError, digest

from .._format.manifest import MANIFEST, FileEntry, Manifest
from .._format.nodes import Node
from .._format.parts import part_bytes, part_key
from .._format.per_rank import fill, json_digest, skeleton_mismatch, split, value_digest
from .._format.state_tree import ArrayLeaf
from .._tiers.commit import StepWriter, TierIO, describe, step_name
from .._tiers.local import LocalStepWriter
from .._tiers.node_tier import NodeTierIO
from .._tiers.nodes import Nodes
from .collective import Exchange
from .files import put_files, root_files, shard_files
from .node_commit import NodeCommit
from .plan import PACK_OWNER, Plan, describe_leaves, make_plan
from .share_plan import Layout, describe_layout, share_plan
from .snapshot import Snapshot

if TYPE_CHECKING:
    from .._options import CheckpointOptions

log = logging.getLogger("trainio.checkpoint._manager")


def _retired(retire: Callable[[int], list[int]] | None, step: int) -> list[int]:
    """The steps ``retire`` names once ``step`` is committed; none when it fails (retention is retried later)."""
    try:
        return retire(step) if retire is not None else []
    except Exception as exc:  # noqa: BLE001 - retention never fails a save
        log.warning("retention on the node tier, after step %d: %s", step, describe(exc))
        return []


class StepSaves:
    """The save protocol of one manager, on every rank: planning in ``save()``, committing in the background."""

    def __init__(self, collective: Exchange, options: CheckpointOptions, nodes: Nodes | None = None) -> None:
        self.collective = collective
        self.nodes = None if nodes is None else NodeCommit(collective, nodes)
        self.rank = self.collective.rank
        self.world = self.collective.world
        self._chunk_bytes = options.chunk_bytes
        self._pack_bytes = options.pack_bytes
        self._rank_pack_bytes = options.rank_pack_bytes
        self._codec = options.codec
        self._previous: tuple[str, Plan] | None = None  # the last plan made by exchanging boxes, by its key
        self._shared: tuple[str, Plan] | None = None  # the last share planned alone, by what it was made from

    def plan(self, step: int, skeleton: Node, leaves: list[ArrayLeaf], problem: BaseException | None,
             tier: TierIO) -> tuple[Plan, str | None]:
        """This rank's plan of ``step``, and the name rank 0 chose for its writers.

        ``skeleton`` and ``leaves`` are this rank's flattened state (per-rank
        nodes holding this rank's sub-tree); on return rank 0's ``skeleton``
        holds every rank's per-rank sub-trees. ``problem`` is this rank's
        reason not to save (a state it cannot flatten, an earlier failure):
        every rank then raises.

        Raises:
            CheckpointError: a rank has a problem, the ranks save different
                steps or states (structure, a replicated array's bytes, or a
                JSON value outside a PerRank), or a rank did not join within
                the timeout.
        """
        shared: Node = {}
        rows: list[list[Any]] = []
        layout: Layout | None = None
        payload: dict[str, Any] = {"step": step, "layout": None, "values": None, "skeleton": None, "own": [],
                                   "own_rows": [], "boxes": None,
                                   "previous": self._previous[0] if self._previous is not None else None}
        if problem is None:
            try:
                shared, payload["skeleton"], payload["own"] = split(skeleton)
                compared = self.world > 1  # a world of one has nothing to compare its arrays with
                digests = [value_digest(leaf) if compared and leaf.replicated else None for leaf in leaves]
                rows = describe_leaves(leaves, digests)
                layout = describe_layout(leaves, self.rank, self.world)
                if layout is not None:
                    payload["layout"], payload["own_rows"] = layout.digest, layout.own
                payload["boxes"] = json_digest([row[:8] for row in rows])
                payload["values"] = json_digest([row[8] for row in rows])
            except Exception as exc:  # noqa: BLE001 - a value that cannot be hashed fails the save on every rank
                problem = CheckpointError(f"hashing the state to compare it between ranks failed: {describe(exc)}")
                problem.__cause__ = exc
        payload["problem"] = None if problem is None else describe(problem)
        everyone = self.collective.gather(f"step {step}: agreeing on the save", payload)
        decision = self._decide(step, everyone, tier) if everyone is not None else None
        decision = self.collective.broadcast(f"step {step}: the save's plan", decision)
        if problem is not None:
            raise problem
        if "error" in decision:
            raise CheckpointError(decision["error"])
        if decision["plan"] == "shared":
            assert layout is not None  # rank 0 chose this plan only when every rank described its layout
            plan = self._share(layout, everyone)
        elif decision["plan"] == "previous":
            assert self._previous is not None  # its key is what this rank sent as "previous"
            plan = self._previous[1]
        else:
            described = self.collective.all_gather(f"step {step}: describing every rank's arrays", rows)
            plan = make_plan(described, self._chunk_bytes, self._pack_bytes, self._codec,
                             {leaf.path: leaf.where for leaf in leaves}, rank_pack_bytes=self._rank_pack_bytes)
            self._previous = (decision["key"], plan)
        if decision["skeletons"]:
            skeletons = self.collective.all_gather(f"step {step}: comparing the ranks' states", shared)
            raise skeleton_mismatch(skeletons)
        if everyone is not None:
            fill(skeleton, [p["own"] for p in everyone])
        return plan, decision["name"]

    def _decide(self, step: int, everyone: list[dict[str, Any]], tier: TierIO) -> dict[str, Any]:
        """Rank 0: how every rank plans ``step``, from what each sent (or the error every rank raises).

        ``"shared"``: every rank described the same layout and replicated
        bytes, so each plans its share alone (:func:`share_plan`);
        ``"previous"``: the ranks' boxes are the last exchanged ones;
        ``"exchange"``: the ranks exchange their boxes (:func:`make_plan`).
        """
        problems = [f"rank {r}: {p['problem']}" for r, p in enumerate(everyone) if p["problem"]]
        if problems:
            return {"error": f"step {step} was not saved on any rank: " + "; ".join(problems)}
        steps = [p["step"] for p in everyone]
        if len(set(steps)) > 1:
            return {"error": f"the ranks called save() with different steps {steps}; every rank must save the "
                             "same step"}
        settings = [self._chunk_bytes, self._pack_bytes, self._rank_pack_bytes, self._codec]
        key = json_digest([*settings, [p["boxes"] for p in everyone]])
        if len({p["values"] for p in everyone}) == 1 and len({p["layout"] for p in everyone}) == 1 \
                and everyone[0]["layout"] is not None:
            how = "shared"
        elif len({p["values"] for p in everyone}) == 1 and all(p["previous"] == key for p in everyone):
            how = "previous"
        else:
            how = "exchange"
        return {"plan": how, "key": key, "skeletons": len({p["skeleton"] for p in everyone}) > 1,
                "name": tier.shared_name(step)}

    def _share(self, layout: Layout, everyone: list[dict[str, Any]] | None) -> Plan:
        """This rank's share of a plan every rank makes alone: the last one while nothing it depends on changed."""
        per_rank = [p["own_rows"] for p in everyone] if everyone is not None else \
            [layout.own if r == self.rank else [] for r in range(self.world)]
        key = json_digest([self._chunk_bytes, self._pack_bytes, self._rank_pack_bytes, self._codec, layout.digest,
                           per_rank])
        if self._shared is not None and self._shared[0] == key:
            return self._shared[1]
        plan = share_plan(layout, per_rank, self.rank, self.world, self._chunk_bytes, self._pack_bytes, self._codec,
                          rank_pack_bytes=self._rank_pack_bytes)
        self._shared = (key, plan)
        return plan

    def share(self, plan: Plan, leaves: list[ArrayLeaf]) -> tuple[list[ArrayLeaf], frozenset[str]]:
        """The leaves this rank snapshots (those it writes), and which of them are packed."""
        owned = {unit.path for unit in plan.owned(self.rank)}
        packed = frozenset(plan.packed_paths()) if self.rank == PACK_OWNER else frozenset()
        return [leaf for leaf in leaves if leaf.path in owned or leaf.path in packed], packed

    def write(self, tier: TierIO, step: int, snapshot: Snapshot, plan: Plan, name: str | None,
              previous: Manifest | None, pool: ThreadPoolExecutor, threads: int,
              retire: Callable[[int], list[int]] | None = None) -> Manifest:
        """Write this rank's share of ``step``; rank 0 commits once every rank reported. Run on every rank.

        Returns the committed step's manifest as far as this rank needs it:
        its own files (what the next save may link), the step's totals. On a
        node tier (``tier`` is this rank's node's directory) the files also go
        to the replica nodes, and every node commits (``node_commit.py``);
        ``retire`` (rank 0) names the steps retention then removes from every node.

        Raises:
            CheckpointError: any rank failed (on every rank), or a rank did not
                report within the timeout (naming it).
        """
        skeleton = snapshot.skeleton
        writer: StepWriter | None = None
        report: dict[str, Any]
        own: dict[str, FileEntry] = {}
        root: dict[str, FileEntry] = {}
        written: dict[str, FileEntry] = {}
        try:
            writer = tier.writer(step, name)
            chunks, members = shard_files(plan, self.rank, snapshot)
            extra = root_files(plan, snapshot) if self.rank == PACK_OWNER else []
            own = put_files(writer, chunks + extra, previous, pool, threads)
            root = {file.key: own.pop(file.key) for file in extra}
            part = None
            if own:
                document = part_bytes(step, self.rank, own, members)
                writer.prepare([part_key(self.rank)])
                writer.write(part_key(self.rank), memoryview(document), len(document))
                part = FileEntry(len(document), digest(document))
            writer.flush()
            written = {**own, **root, **({part_key(self.rank): part} if part else {})}
            writer.check(written)
            report = {"part": None if part is None else [part.size, part.xxh3],
                      "root": {key: [e.size, e.xxh3] for key, e in root.items()},
                      "bytes": sum(e.size for e in own.values()) + (part.size if part else 0), "files": len(own)}
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the step everywhere
            report = {"error": describe(exc)}
        finally:
            snapshot.release()
        aborts = self.rank == PACK_OWNER if self.nodes is None else self.nodes.nodes.is_leader(self.rank)
        try:
            if self.nodes is not None:
                assert isinstance(writer, LocalStepWriter | None)  # a node tier's directory is local
                report = self.nodes.replicate(step, writer, written if "error" not in report else {}, report)
            reports = self.collective.gather(f"step {step}: collecting every rank's part", report, background=True)
        except CheckpointError:
            if aborts and writer is not None:
                writer.abort()
            raise
        verdict = None
        committed: Manifest | None = None
        if reports is not None:
            verdict, committed = self._commit(tier, step, skeleton, plan, writer, reports, retire)
        verdict = self.collective.broadcast(f"step {step}: waiting for rank 0's commit", verdict, background=True)
        if "error" in verdict:
            if aborts and writer is not None and self.nodes is not None:
                writer.abort()
            raise CheckpointError(verdict["error"])
        if self.nodes is not None:
            assert isinstance(tier, NodeTierIO) and isinstance(writer, LocalStepWriter | None)
            self.nodes.publish(tier, writer, step, name or "", verdict["root"], verdict["retire"])
        if committed is not None:
            return replace(committed, files={**committed.files, **own})
        return Manifest(step, skeleton, plan.arrays, {**root, **own}, world_size=self.world, pack=plan.pack,
                        totals=(int(verdict["totals"][0]), int(verdict["totals"][1])))

    def _commit(self, tier: TierIO, step: int, skeleton: Node, plan: Plan, writer: StepWriter | None,
                reports: list[dict[str, Any]],
                retire: Callable[[int], list[int]] | None) -> tuple[dict[str, Any], Manifest | None]:
        """Rank 0: commit the step if every rank wrote its share; the verdict for the ranks, and the root manifest.

        Each rank checked its own files before it reported; rank 0 checks the
        root's files and every part before the root is written. On a node
        tier, rank 0 checks the replicas instead and every node commits
        (the verdict carries the root manifest and the steps to retire).
        """
        errors = [f"rank {r}: {report['error']}" for r, report in enumerate(reports) if "error" in report]
        if not errors and self.nodes is not None:
            errors = self.nodes.check_replicas(reports)
        if not errors and writer is not None:
            root = {key: FileEntry(size, xxh3) for key, (size, xxh3) in reports[PACK_OWNER]["root"].items()}
            parts = [None if r["part"] is None else FileEntry(*r["part"]) for r in reports]
            totals = (sum(r["bytes"] for r in reports) + sum(e.size for e in root.values()),
                      sum(r["files"] for r in reports) + len(root) + sum(p is not None for p in parts))
            manifest = Manifest(step, skeleton, plan.arrays, root, world_size=self.world, pack=plan.pack, parts=parts,
                                writers=plan.writers, meshes=plan.meshes, totals=totals, metrics=plan.metrics)
            document = manifest.to_bytes()
            try:
                Manifest.from_bytes(document, tier.url, f"{step_name(step)}/{MANIFEST}")  # the root is whole
                if self.nodes is not None:
                    return {"totals": list(totals), "root": document, "retire": _retired(retire, step)}, manifest
                writer.commit(document, {**root, **{part_key(r): p for r, p in enumerate(parts) if p is not None}})
                return {"totals": list(totals)}, manifest
            except Exception as exc:  # noqa: BLE001 - becomes the step's failure on every rank
                errors.append(f"rank {self.rank}: {describe(exc)}")
        if writer is not None:
            writer.abort()
        return {"error": f"{tier.label}: saving step {step} failed: " + "; ".join(errors)}, None

    def close(self) -> None:
        """Release the process groups."""
        self.collective.close()

    def agree(self, what: str, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (the step to restore, for one)."""
        return self.collective.broadcast(what, value)
