"""The save of a step to a node tier: replicas over the process group, and a commit record on every node.

After each rank has written its files into its node's directory (the temp
directory every rank of the save shares by name):

1. every rank sends its files (its part manifest, and rank 0 the root's files)
   to the rank with its local index on each replica node, in exchanges of at
   most ``bundle.ROUND_BYTES`` a message (``Exchange.exchange``); each receiver checks every file's xxh3-128 against
   what its sender hashed, writes them into its own node's directory, makes
   them durable and checks they are in place; it reports the digest of the
   list it received, which rank 0 compares with the sender's;
2. rank 0 decides (``check_replicas``, then the root manifest as for a shared
   tier) and sends every rank the root manifest;
3. each node's first rank writes the node's commit record (``node.json``) and
   the root manifest, and renames the directory into place (``publish``);
   rank 0 gathers the outcomes, and where a node failed every node that
   published removes the step again, so no node keeps a step another lacks
   except after a crash in between, which the next start settles.
"""

from __future__ import annotations

import json
from typing import Any

from trainio.storage import CheckpointError, digest

from .._format.checks import FileEntry
from .._format.manifest import MANIFEST, Manifest
from .._format.parts import part_key
from .._tiers.commit import describe, step_name
from .._tiers.local import LocalStepWriter
from .._tiers.node_tier import NODE_RECORD, NodeRecord, NodeTierIO, read_written
from .._tiers.nodes import Nodes
from .bundle import bundle, rounds, unbundle
from .collective import Exchange


def _listing_digest(entries: dict[str, FileEntry]) -> str:
    return digest(json.dumps(sorted([k, e.size, e.xxh3] for k, e in entries.items())).encode())


class NodeCommit:
    """The node-tier steps of one save, on every rank."""

    def __init__(self, collective: Exchange, nodes: Nodes) -> None:
        self.collective = collective
        self.nodes = nodes
        self.rank = collective.rank

    def replicate(self, step: int, writer: LocalStepWriter | None, files: dict[str, FileEntry],
                  report: dict[str, Any]) -> dict[str, Any]:
        """Send this rank's ``files`` to its replica ranks and keep the files sent to it; the updated report.

        Every rank takes part, also one whose own write failed (it sends nothing).
        """
        batches = rounds({key: entry.size for key, entry in files.items()}) if "error" not in report else []
        if batches:
            report["sent"] = _listing_digest(files)
        count = self.collective.most(f"step {step}: rounds of node replicas", len(batches), background=True)
        kept: dict[int, dict[str, FileEntry]] = {}
        for turn in range(count):  # every rank takes part in every round, also one that failed
            outgoing: dict[int, bytes] = {}
            if turn < len(batches) and "error" not in report:
                assert writer is not None
                try:
                    message = bundle({key: (files[key], read_written(writer, key)) for key in batches[turn]})
                    outgoing = dict.fromkeys(self.nodes.replica_targets(self.rank), message)
                except Exception as exc:  # noqa: BLE001 - reported to rank 0 like a failed write
                    report = {"error": describe(exc)}
            received = self.collective.exchange(f"step {step}: sending node replicas", outgoing, background=True)
            if "error" not in report:
                report = self._keep(writer, received, kept, report)
        if "error" in report or not kept:
            return report
        assert writer is not None
        try:
            writer.flush()
            writer.check({key: entry for entries in kept.values() for key, entry in entries.items()})
            report["kept"] = {str(source): _listing_digest(entries) for source, entries in kept.items()}
        except Exception as exc:  # noqa: BLE001 - reported to rank 0 like a failed write
            report = {"error": f"keeping replicas: {describe(exc)}"}
        return report

    @staticmethod
    def _keep(writer: LocalStepWriter | None, received: dict[int, memoryview], kept: dict[int, dict[str, FileEntry]],
              report: dict[str, Any]) -> dict[str, Any]:
        """Write the replica files of one round into this node's directory; the report (an error if it failed)."""
        assert writer is not None
        try:
            for source, message in sorted(received.items()):
                files_of = unbundle(message, f"rank {source}")
                writer.prepare(list(files_of))
                for key, (entry, data) in files_of.items():
                    writer.write(key, data, entry.size)
                    kept.setdefault(source, {})[key] = entry
        except Exception as exc:  # noqa: BLE001 - reported to rank 0 like a failed write
            return {"error": f"keeping replicas: {describe(exc)}"}
        return report

    def check_replicas(self, reports: list[dict[str, Any]]) -> list[str]:
        """Rank 0: what is wrong with the replicas the ranks reported (nothing: every copy is whole)."""
        problems = []
        for rank, report in enumerate(reports):
            sent = report.get("sent")
            if sent is None:
                continue
            for target in self.nodes.replica_targets(rank):
                kept = reports[target].get("kept", {}).get(str(rank))
                if kept != sent:
                    problems.append(f"rank {target}: its replica of rank {rank}'s files "
                                    f"{'is missing' if kept is None else 'differs from what was sent'}")
        return problems

    def record(self, step: int, run: str, document: bytes, manifest: Manifest) -> NodeRecord:
        """The commit record of this rank's node: the parts its own ranks and their replicas wrote here."""
        node = self.nodes.node_of(self.rank)
        ranks = set(self.nodes.ranks(node))
        for member in self.nodes.ranks(node):
            ranks.update(self.nodes.replica_sources(member))
        parts = manifest.parts or []
        held = {r: e for r in sorted(ranks) if r < len(parts) and (e := parts[r]) is not None}
        return NodeRecord(step, run, FileEntry(len(document), digest(document)), held, 0 in ranks,
                          sum(e is not None for e in parts), self.nodes.world)

    def publish(self, tier: NodeTierIO, writer: LocalStepWriter | None, step: int, run: str, document: bytes,
                retire: list[int]) -> None:
        """Commit ``step`` on every node (each node's first rank writes its record and renames), or on none.

        Raises:
            CheckpointError: a node could not commit (on every rank, naming it); the step is on no node.
        """
        outcome: str | None = None
        leader = self.nodes.is_leader(self.rank)
        if leader:
            try:
                assert writer is not None
                manifest = Manifest.from_bytes(document, tier.url, f"{step_name(step)}/{MANIFEST}")
                record = self.record(step, run, document, manifest)
                data = record.to_bytes()
                writer.write(NODE_RECORD, memoryview(data), len(data))
                writer.commit(document, {part_key(r): e for r, e in record.parts.items()})
            except Exception as exc:  # noqa: BLE001 - becomes the step's failure on every rank
                outcome = f"rank {self.rank} (node {self.nodes.node_of(self.rank)}): {describe(exc)}"
        outcomes = self.collective.gather(f"step {step}: committing on every node", outcome, background=True)
        failed = [o for o in outcomes if o] if outcomes is not None else None
        failed = self.collective.broadcast(f"step {step}: every node's commit", failed, background=True)
        if failed:
            if leader:
                tier.delete(step)
                if writer is not None:
                    writer.abort()
            raise CheckpointError(f"{tier.label}: saving step {step} failed: " + "; ".join(failed))
        if leader:
            for old in retire:
                tier.delete(old)
