"""Restoring from a node tier: find what every node holds, read the own node's, fetch the rest from peers.

Collective, on every rank:

1. each node's first rank lists the steps its directory holds, from their
   commit records (run, root digest, parts); rank 0 gathers them with the
   further tiers' steps and picks the step (the newest whose every part is on
   some node, or committed on a further tier) and which nodes hold each part
   (``choose``), and tells every rank;
2. a rank whose node lacks the step asks a node that has it for the root
   manifest; then every rank asks the holders of the part manifests and files
   it reads that its node lacks (``Exchange.exchange``; a request names keys,
   the answer carries their bytes, each checked against the manifest on
   arrival); files no node holds are read from the further tiers;
3. a node that held nothing of the step (a replaced node, an empty
   directory) gets its own ranks' parts written back and committed there,
   when the job has the world size the step was saved with.

Which directory a node sees is never trusted to be "its" part: the records
say what each holds, so permuted or moved directories serve whoever needs them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from trainio.storage import CheckpointError, StoreError, digest

from .._format.manifest import MANIFEST, FileEntry
from .._format.parts import part_key
from .._save.bundle import bundle, rounds, unbundle
from .._save.collective import Exchange
from .._tiers.commit import TierIO, describe, step_name
from .._tiers.node_holdings import node_groups
from .._tiers.node_tier import NODE_RECORD, NodeRecord, NodeTierIO
from .._tiers.nodes import Nodes
from .node_view import ROOT_PART, NodeView
from .report import ReadReport
from .step_reader import StepReader

log = logging.getLogger("trainio.checkpoint._manager")


def choose(held: list[dict[int, list[Any]]], further: dict[int, list[str]], step: int | None,
           nodes: Nodes) -> dict[str, Any]:
    """Rank 0: the step to restore and the nodes that hold each of its parts (or the error every rank raises).

    ``held[r]`` is what rank ``r``'s node holds (its first rank's report, else
    empty; see :func:`node_groups`); ``further`` the further tiers holding each step.
    """
    best = node_groups(held, nodes)
    available = {s for s, g in best.items() if g["whole"]} | set(further)
    if step is None:
        if not available:
            return {"error": "no step is whole on the nodes or committed on a further tier"}
        step = max(available)
    elif step not in available:
        partial = " (the nodes hold only some of its parts)" if step in best else ""
        return {"error": f"step {step} is neither whole on the nodes{partial} nor committed on a further tier; "
                         f"whole or committed: {sorted(available)}"}
    return {"step": step, "group": best.get(step), "further": further.get(step, [])}


class NodeRestore:
    """One restore of a step from a node tier and the further tiers, on every rank."""

    def __init__(self, collective: Exchange, nodes: Nodes, io: NodeTierIO, further: list[TierIO],
                 pool: ThreadPoolExecutor, threads: int, hold: Callable[[], None]) -> None:
        self.collective = collective
        self.hold = hold  # takes the node directory's lease (a node's first rank), before a write-back commits
        self.nodes = nodes
        self.io = io
        self.further = further
        self.pool = pool
        self.threads = threads
        self.rank = collective.rank

    def _holder(self, nodes: list[int]) -> int:
        """The rank to ask for a file held on ``nodes``: spread over the holders and their ranks."""
        node = nodes[self.rank % len(nodes)]
        ranks = self.nodes.ranks(node)
        return ranks[self.rank % len(ranks)]

    def _fetch(self, what: str, step: int, wants: dict[int, list[str]]) -> dict[str, bytes]:
        """Ask each rank in ``wants`` for the files listed; serve what the others ask of this node.

        Answers go in rounds of at most ``ROUND_BYTES`` a message. A file that
        arrives damaged is left out (the restore reads it from the next tier).
        """
        requests = self.collective.exchange(f"{what}: asking", {r: json.dumps(keys).encode()
                                                                for r, keys in wants.items()})
        plans = {asker: rounds({key: self._size(step, key) for key in json.loads(bytes(message))})
                 for asker, message in requests.items()}
        count = self.collective.most(f"{what}: rounds", max((len(b) for b in plans.values()), default=0))
        fetched: dict[str, bytes] = {}
        for turn in range(count):
            answers = {asker: self._answer(step, asker, batches[turn]) for asker, batches in plans.items()
                       if turn < len(batches)}
            for sender, message in self.collective.exchange(f"{what}: sending", answers).items():
                try:
                    fetched.update({key: bytes(data) for key, (_, data) in unbundle(message, f"rank {sender}").items()})
                except CheckpointError as exc:
                    log.warning("%s: %s", self.io.label, exc)
        return fetched

    def _size(self, step: int, key: str) -> int:
        try:
            return self.io.store.size(f"{step_name(step)}/{key}")
        except (StoreError, OSError):
            return 0  # not served: the read below says why

    def _answer(self, step: int, asker: int, keys: list[str]) -> bytes:
        """The files ``keys`` of this node's copy of ``step``, for rank ``asker`` (those it can read)."""
        files: dict[str, tuple[FileEntry, bytes]] = {}
        for key in keys:
            try:
                data = self.io.store.get(f"{step_name(step)}/{key}")
            except (StoreError, OSError) as exc:
                log.warning("%s: cannot serve %s of step %d to rank %d: %s", self.io.label, key, step, asker,
                            describe(exc))
                continue
            files[key] = (FileEntry(len(data), digest(data)), data)
        return bundle(files)

    def restore(self, step: int | None, keys: list[str] | None, into: Any,
                further_steps: Callable[[], dict[int, list[str]]], world: int) -> tuple[Any, ReadReport]:
        """The state of ``step`` (default: the newest available), and what was read from where.

        Raises:
            CheckpointError: no such step, or a file is damaged or missing everywhere (on every rank alike).
        """
        held = self.collective.gather("restore: what each node holds",
                                      self.io.summaries() if self.nodes.is_leader(self.rank) else {})
        decision = None
        if held is not None:
            decision = choose(held, further_steps(), step, self.nodes)
            decision["name"] = self.io.shared_name(decision.get("step", 0))
        decision = self.collective.broadcast("restore: the step and who holds it", decision)
        if "error" in decision:
            raise CheckpointError(decision["error"])
        step = int(decision["step"])
        group = decision["group"]
        further = [t for t in self.further if t.label in decision["further"]]
        if group is None:
            reader = StepReader(further, step, self.pool, self.threads, rank=self.rank, world=world)
            return reader.load(keys, into), reader.report
        lacking = len(group["nodes"]) < self.nodes.count
        problem: BaseException | None = None
        view: NodeView | None = None
        try:  # _view's exchange comes before anything in it can fail
            view = self._view(step, group)
            reader = StepReader([view, *further], step, self.pool, self.threads, rank=self.rank, world=world)
            load = reader.prepare(keys, into)
            needed = [key for key, _, _ in load.reads + load.in_packs]  # ranked chunks: their writers' parts
            write_back = lacking and self.io.record(step) is None and view.root.world_size == world
        except Exception as exc:  # noqa: BLE001 - raised after this rank has done its share of the exchanges
            problem, needed, write_back = exc, [], False
        # Every rank takes part in every exchange below, the same number of times, whatever happened above.
        self._fetch_parts(view, group, {view.part_of(k) for k in needed} | ({self.rank} if write_back else set())
                          if view is not None else set())
        if problem is None:
            try:
                reader.resolve(load)  # the parts are here now: which rank packs hold the ranked chunks
                needed = [key for key, _, _ in load.reads]
            except Exception as exc:  # noqa: BLE001 - as above
                problem, needed, write_back = exc, [], False
        if write_back:
            assert view is not None
            try:
                needed += list(view.root.files.part(self.rank))  # type: ignore[attr-defined]
                needed += list(view.root.own_files) if self.rank == 0 else []
            except Exception as exc:  # noqa: BLE001 - only the write-back is lost
                log.warning("%s: cannot write step %d back: %s", self.io.label, step, describe(exc))
                write_back = False
        self._fetch_files(view, group, needed)
        state = None
        if problem is None:
            try:
                state = reader.finish(load)
            except Exception as exc:  # noqa: BLE001 - as above
                problem = exc
        if lacking:
            self._write_back(view, group, decision["name"], write_back and problem is None,
                             reader.report if problem is None else ReadReport(step))
        if problem is not None:
            raise problem
        return state, reader.report

    def _view(self, step: int, group: dict[str, Any]) -> NodeView:
        """This rank's view of the step: its node's record, the root manifest (fetched if its node lacks it)."""
        root = FileEntry(*group["root"])
        node = self.nodes.node_of(self.rank)
        record = self.io.record(step) if node in group["nodes"] else None
        if record is not None and (record.run != group["run"] or record.root != root):
            record = None
        document: bytes | None = None
        if record is not None:
            try:
                document = self.io.read_root(step, root)
            except (StoreError, OSError, CheckpointError):
                record = None  # damaged here, and no node said so: no part of this directory is used
        # A rank whose node lacks the step, or holds a damaged copy of its root, asks a node that has it.
        wants = {} if record is not None else {self._holder(group["nodes"]): [MANIFEST]}
        document = self._fetch(f"restore of step {step}: root manifest", step, wants).get(MANIFEST, document)
        if document is None or len(document) != root.size or digest(document) != root.xxh3:
            raise CheckpointError(f"{self.io.label}: step {step}: the root manifest from the nodes is missing or "
                                  "damaged")
        parts = set(record.parts) if record is not None else set()
        return NodeView(self.io, step, document, parts, record.root_files if record is not None else False)

    def _fetch_parts(self, view: NodeView | None, group: dict[str, Any], parts: set[int | None]) -> None:
        wants: dict[int, list[str]] = {}
        held = view.parts if view is not None else set()
        for part in sorted(p for p in parts if p is not None and p != ROOT_PART and p not in held):
            holders = group["parts"].get(part)
            if holders:
                wants.setdefault(self._holder(holders), []).append(part_key(part))
        self._fetch_into(view, f"restore of step {group['step']}: part manifests", group["step"], wants)

    def _fetch_files(self, view: NodeView | None, group: dict[str, Any], keys: list[str]) -> None:
        wants: dict[int, list[str]] = {}
        for key in dict.fromkeys(keys):
            assert view is not None  # a rank without a view asks for nothing
            if view.held_here(key) or key in view.fetched:
                continue
            part = view.part_of(key)
            holders = group["root_nodes"] if part == ROOT_PART else group["parts"].get(part)
            if holders:
                wants.setdefault(self._holder(holders), []).append(key)
        self._fetch_into(view, f"restore of step {group['step']}: files", group["step"], wants)

    def _fetch_into(self, view: NodeView | None, what: str, step: int, wants: dict[int, list[str]]) -> None:
        fetched = self._fetch(what, step, wants)
        if view is not None:
            view.fetched.update(fetched)

    def _write_back(self, view: NodeView | None, group: dict[str, Any], name: str, mine: bool,
                    report: ReadReport) -> None:
        """Give a node that held nothing of the step its own ranks' parts again, committed there."""
        step = int(group["step"])
        written: dict[str, Any] = {"parts": [], "root_files": False}
        writer = None
        if mine:
            assert view is not None
            try:
                files = dict(view.root.files.part(self.rank))  # type: ignore[attr-defined]
                entry = (view.root.parts or [])[self.rank]
                if entry is not None:
                    files[part_key(self.rank)] = entry
                if self.rank == 0:
                    files.update(view.root.own_files)
                writer = self.io.writer(step, name)
                writer.prepare(list(files))
                for key, file_entry in files.items():
                    data = view.read(step, key, file_entry)
                    writer.write(key, memoryview(data), file_entry.size)
                writer.flush()
                writer.check(files)
                written = {"parts": [self.rank] if entry is not None else [], "root_files": self.rank == 0}
            except Exception as exc:  # noqa: BLE001 - the restore stands; only the node's copy is missing
                log.warning("%s: could not write step %d back to node %d: %s", self.io.label, step,
                            self.nodes.node_of(self.rank), describe(exc))
                written = {"error": describe(exc)}
        everyone = self.collective.gather(f"restore of step {step}: writing parts back", written)
        by_node: dict[int, list[dict[str, Any]]] | None = None
        if everyone is not None:
            by_node = {}
            for rank, outcome in enumerate(everyone):
                by_node.setdefault(self.nodes.node_of(rank), []).append(outcome)
            by_node = {n: r for n, r in by_node.items() if any(m.get("parts") or m.get("root_files") or "error" in m
                                                                 for m in r)}
        by_node = self.collective.broadcast(f"restore of step {step}: the parts written back", by_node)
        node = self.nodes.node_of(self.rank)
        mates = by_node.get(node, [])
        if not self.nodes.is_leader(self.rank) or writer is None:
            return
        if any("error" in m for m in mates):
            writer.abort()
            return
        assert view is not None  # this rank wrote back, so it had a view
        parts = {r: e for m in mates for r in m["parts"] if (e := (view.root.parts or [])[r]) is not None}
        record = NodeRecord(step, group["run"], FileEntry(*group["root"]), parts,
                            any(m["root_files"] for m in mates), group["count"], group["world"])
        try:
            self.hold()
            data = record.to_bytes()
            writer.write(NODE_RECORD, memoryview(data), len(data))
            writer.commit(view.document, {})
        except Exception as exc:  # noqa: BLE001 - the restore stands; only the node's copy is missing
            log.warning("%s: could not commit step %d back on node %d: %s", self.io.label, step, node, describe(exc))
            writer.abort()
            return
        report.repaired.extend(f"{self.io.label}:node {node}:{part_key(r)}" for r in sorted(parts))
