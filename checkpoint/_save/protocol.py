"""The save of a step, by any number of ranks: agree on a plan, each rank writes its share, rank 0 commits.

A single process saves as a world of one, through the same planning,
writing and commit code (its exchanges are local: :class:`WorldOfOne`).

Agreeing on the plan takes one exchange (all_gather) in ``save()`` when the
state's layout is the previous save's: each rank sends digests of its arrays'
layout and of its replicated arrays' live bytes (xxh3-128 of each, in a world
of more than one), the digest of its skeleton's shared part (JSON leaves
included), its own :class:`~trainio.checkpoint.PerRank` sub-trees, and the key
of the plan it made last. Every rank then checks the same things alike and
raises alike. Where the layout changed, or replicated bytes differ, a second
exchange sends every rank's array rows, from which every rank makes the plan
(and names what differs); where the skeletons differ, a third sends the
skeletons, to name the first difference. Then, in the background:

1. every rank writes the files of its boxes (rank 0 also the pack and the
   metadata documents) into its writer for the step and makes them durable;
2. every rank reports its files' sizes and digests to rank 0 (gather);
3. rank 0 checks that every rank succeeded and no file has two writers,
   builds the manifest, and commits it (:meth:`StepWriter.commit`: lease and
   files checked, manifest last), or aborts the step;
4. rank 0 tells every rank the outcome (broadcast): the manifest, or the error.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from trainio.storage import CheckpointError

from .._format.manifest import MANIFEST, FileEntry, Manifest
from .._format.nodes import Node
from .._format.per_rank import fill, json_digest, skeleton_mismatch, split, value_digest
from .._format.state_tree import ArrayLeaf
from .._tiers.commit import StepWriter, TierIO, describe, step_name
from .collective import Exchange
from .files import put_files, shard_files
from .plan import PACK_OWNER, Plan, describe_leaves, make_plan
from .snapshot import Snapshot


class StepSaves:
    """The save protocol of one manager, on every rank: planning in ``save()``, committing in the background."""

    def __init__(self, collective: Exchange, chunk_bytes: int, pack_bytes: int, codec: str | None) -> None:
        self.collective = collective
        self.rank = self.collective.rank
        self.world = self.collective.world
        self._chunk_bytes = chunk_bytes
        self._pack_bytes = pack_bytes
        self._codec = codec
        self._previous: tuple[str, Plan] | None = None  # the last plan made, by the digest of every rank's layout

    def plan(self, step: int, skeleton: Node, leaves: list[ArrayLeaf], problem: BaseException | None,
             tier: TierIO) -> tuple[Plan, str | None]:
        """The plan of ``step`` that every rank computes alike, and the name rank 0 chose for its writers.

        ``skeleton`` and ``leaves`` are this rank's flattened state (per-rank
        nodes holding this rank's sub-tree); on return every per-rank node of
        ``skeleton`` holds every rank's. ``problem`` is this rank's reason not
        to save (a state it cannot flatten, an earlier failure): every rank
        then raises.

        Raises:
            CheckpointError: a rank has a problem, the ranks save different
                steps or states (structure, a replicated array's bytes, or a
                JSON value outside a PerRank), or a rank did not join within
                the timeout.
        """
        shared: Node = {}
        rows: list[list[Any]] = []
        payload: dict[str, Any] = {"step": step, "layout": None, "values": None, "skeleton": None, "own": [],
                                   "previous": self._previous[0] if self._previous is not None else None,
                                   "name": tier.shared_name(step) if self.rank == PACK_OWNER else None}
        if problem is None:
            try:
                shared, payload["skeleton"], payload["own"] = split(skeleton)
                compared = self.world > 1  # a world of one has nothing to compare its arrays with
                digests = [value_digest(leaf) if compared and leaf.replicated else None for leaf in leaves]
                rows = describe_leaves(leaves, digests)
                payload["layout"] = json_digest([row[:8] for row in rows])
                payload["values"] = json_digest([row[8] for row in rows])
            except Exception as exc:  # noqa: BLE001 - a value that cannot be hashed fails the save on every rank
                problem = CheckpointError(f"hashing the state to compare it between ranks failed: {describe(exc)}")
                problem.__cause__ = exc
        payload["problem"] = None if problem is None else describe(problem)
        everyone = self.collective.all_gather(f"step {step}: agreeing on the save", payload)
        if problem is not None:
            raise problem
        problems = [f"rank {r}: {p['problem']}" for r, p in enumerate(everyone) if p["problem"]]
        if problems:
            raise CheckpointError(f"step {step} was not saved on any rank: " + "; ".join(problems))
        steps = [p["step"] for p in everyone]
        if len(set(steps)) > 1:
            raise CheckpointError(f"the ranks called save() with different steps {steps}; every rank must save "
                                  "the same step")
        layout = json_digest([self._chunk_bytes, self._pack_bytes, self._codec, [p["layout"] for p in everyone]])
        # Decided from what every rank sent, so every rank takes the same branch (and the same exchanges).
        reuse = len({p["values"] for p in everyone}) == 1 and all(p["previous"] == layout for p in everyone)
        if reuse:
            assert self._previous is not None  # its key is what this rank sent as "previous"
            plan = self._previous[1]
        else:
            described = self.collective.all_gather(f"step {step}: describing every rank's arrays", rows)
            plan = make_plan(described, self._chunk_bytes, self._pack_bytes, self._codec,
                             {leaf.path: leaf.where for leaf in leaves})
            self._previous = (layout, plan)
        if len({p["skeleton"] for p in everyone}) > 1:
            skeletons = self.collective.all_gather(f"step {step}: comparing the ranks' states", shared)
            raise skeleton_mismatch(skeletons)
        fill(skeleton, [p["own"] for p in everyone])
        return plan, everyone[PACK_OWNER]["name"]

    def share(self, plan: Plan, leaves: list[ArrayLeaf]) -> tuple[list[ArrayLeaf], frozenset[str]]:
        """The leaves this rank snapshots (those it writes), and which of them are packed."""
        owned = {unit.path for unit in plan.owned(self.rank)}
        packed = frozenset(plan.packed_paths()) if self.rank == PACK_OWNER else frozenset()
        return [leaf for leaf in leaves if leaf.path in owned or leaf.path in packed], packed

    def write(self, tier: TierIO, step: int, snapshot: Snapshot, plan: Plan, name: str | None,
              previous: Manifest | None, pool: ThreadPoolExecutor, threads: int) -> Manifest:
        """Write this rank's share of ``step``; rank 0 commits once every rank reported. Run on every rank.

        Raises:
            CheckpointError: any rank failed (on every rank), or a rank did not
                report within the timeout (naming it).
        """
        skeleton = snapshot.skeleton
        writer: StepWriter | None = None
        report: dict[str, Any]
        try:
            writer = tier.writer(step, name)
            entries = put_files(writer, shard_files(plan, self.rank, snapshot), previous, pool, threads)
            writer.flush()
            report = {"files": {key: [e.size, e.xxh3] for key, e in entries.items()}}
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the step everywhere
            report = {"error": describe(exc)}
        finally:
            snapshot.release()
        try:
            reports = self.collective.gather(f"step {step}: collecting every rank's files", report, background=True)
        except CheckpointError:
            if self.rank == PACK_OWNER and writer is not None:
                writer.abort()
            raise
        verdict = None
        committed: Manifest | None = None
        if reports is not None:
            verdict, committed = self._commit(tier, step, skeleton, plan, writer, reports)
        verdict = self.collective.broadcast(f"step {step}: waiting for rank 0's commit", verdict, background=True)
        if "error" in verdict:
            raise CheckpointError(verdict["error"])
        return committed or Manifest.from_bytes(verdict["manifest"], tier.url, f"{step_name(step)}/{MANIFEST}")

    def _commit(self, tier: TierIO, step: int, skeleton: Node, plan: Plan, writer: StepWriter | None,
                reports: list[dict[str, Any]]) -> tuple[dict[str, Any], Manifest | None]:
        """Rank 0: commit the step if every rank wrote its share; the verdict for the ranks, and the manifest."""
        errors = [f"rank {r}: {report['error']}" for r, report in enumerate(reports) if "error" in report]
        if not errors and writer is not None:
            files: dict[str, FileEntry] = {}
            writers: dict[str, int] = {}
            for rank, report in enumerate(reports):
                for key, (size, digest) in report["files"].items():
                    if key in writers:
                        errors.append(f"{key} was written by ranks {writers[key]} and {rank}")
                    writers[key] = rank
                    files[key] = FileEntry(size, digest)
            manifest = Manifest(step, skeleton, plan.arrays, files, world_size=self.world, pack=plan.pack)
            document = manifest.to_bytes()
            if not errors:
                try:
                    Manifest.from_bytes(document, tier.url, f"{step_name(step)}/{MANIFEST}")  # nothing is missing
                    writer.commit(document, files)
                    return {"manifest": document}, manifest
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
