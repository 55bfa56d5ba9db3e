"""One node's directory of a node tier: steps that hold some of the parts, and the record of which.

A node's copy of a step is a step directory like a shared tier's, holding the
root manifest and the files of the parts this node keeps (its own ranks', and
those it keeps replicas of), plus ``node.json``: the node's commit record,
sealed, naming the save (``run``, the name its writers shared), the root
manifest's size and digest, the parts held (``{rank: {size, xxh3}}`` of each
part manifest), whether the root's own files (metadata, pack) are here, and
how many parts the step has. A restore believes what the records say each
directory holds, not which node's directory it is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from trainio.storage import (
    TEMP_MARKER,
    CheckpointError,
    FormatError,
    NotFound,
    Store,
    StoreError,
    fsync_dir,
    load_sealed,
    seal_json,
)

from .._format.checks import Checks, FileEntry
from .._format.manifest import MANIFEST, Manifest
from .._format.parts import StepFiles, part_key
from .commit import TierIO, step_name
from .local import LocalStepWriter, LocalTierIO

log = logging.getLogger("trainio.checkpoint._manager")

NODE_RECORD = "node.json"
"""Key, in a node's step directory, of its commit record."""
_FORMAT = "trainio.checkpoint.node"


@dataclass(frozen=True)
class NodeRecord:
    """What one node's directory holds of a step (see the module's docstring)."""

    step: int
    run: str
    root: FileEntry
    parts: dict[int, FileEntry]
    root_files: bool
    part_count: int
    world: int
    """The world size of the job that saved the step."""

    def summary(self) -> list[Any]:
        """What a node reports of this record to rank 0: run, root size and digest, parts, root files, counts."""
        return [self.run, self.root.size, self.root.xxh3, sorted(self.parts), self.root_files, self.part_count,
                self.world]

    def to_bytes(self) -> bytes:
        """The record as written, sealed."""
        return seal_json({"format": _FORMAT, "version": 1, "step": self.step, "run": self.run,
                          "root": {"size": self.root.size, "xxh3": self.root.xxh3},
                          "parts": {str(r): {"size": e.size, "xxh3": e.xxh3} for r, e in sorted(self.parts.items())},
                          "root_files": self.root_files, "part_count": self.part_count, "world": self.world})

    @classmethod
    def from_bytes(cls, data: bytes, where: str, key: str, step: int) -> NodeRecord:
        """A record, validated.

        Raises:
            FormatError: its seal, format, step or an entry is wrong.
        """
        doc = load_sealed(data, where, key, max_bytes=64 << 20)
        checks = Checks(where, key)
        checks.check(doc.get("format") == _FORMAT and doc.get("version") == 1, f"is not a version-1 {_FORMAT}")
        checks.check(doc.get("step") == step, f"is the record of step {doc.get('step')!r}, not {step}")
        run, parts, count, world = doc.get("run"), doc.get("parts"), doc.get("part_count"), doc.get("world")
        checks.check(isinstance(run, str) and isinstance(parts, dict) and type(count) is int and count >= 0
                     and type(world) is int and world >= 1 and type(doc.get("root_files")) is bool,
                     "has a malformed run, parts, part_count, world or root_files")
        assert isinstance(parts, dict) and isinstance(run, str) and isinstance(count, int) and isinstance(world, int)
        held = {}
        for rank, entry in parts.items():
            checks.check(rank.isdigit(), f"names part {rank!r}, not a rank")
            held[int(rank)] = checks.file_entry(f"parts[{rank}]", entry)
        return cls(step, run, checks.file_entry("root", doc.get("root")), held, bool(doc["root_files"]), count, world)


def record_of(tier: TierIO, step: int) -> NodeRecord | None:
    """The node record of ``step`` on ``tier`` (a node's directory of a node tier), or None on any other tier.

    Raises:
        FormatError: the record is damaged.
    """
    key = f"{step_name(step)}/{NODE_RECORD}"
    try:
        data = tier.store.get(key)
    except NotFound:
        return None
    return NodeRecord.from_bytes(data, tier.url, key, step)


def held_files(manifest: Manifest, record: NodeRecord) -> dict[str, FileEntry]:
    """Every file of the step that a node's record says its directory holds (part manifests included)."""
    files = dict(manifest.own_files) if record.root_files else {}
    parts = manifest.files
    assert isinstance(parts, StepFiles), "a node tier's steps have part manifests"
    for rank, entry in record.parts.items():
        files[part_key(rank)] = entry
        files.update(parts.part(rank))
    return files


class NodeTierIO(LocalTierIO):
    """This rank's node's directory of a node tier."""

    def __init__(self, store: Store, label: str, root: str, node: int) -> None:
        super().__init__(store, label, root)
        self.node = node

    def record(self, step: int) -> NodeRecord | None:
        """What this directory holds of committed ``step``, or None when it has no valid record of it."""
        key = f"{step_name(step)}/{NODE_RECORD}"
        try:
            with open(os.path.join(self.root, key), "rb") as file:
                data = file.read(64 << 20)
            return NodeRecord.from_bytes(data, self.url, key, step)
        except FileNotFoundError:
            return None
        except (OSError, StoreError, FormatError) as exc:
            log.warning("%s: node record of step %d is unreadable, its files are not used: %s", self.label, step, exc)
            return None

    def summaries(self) -> dict[int, list[Any]]:
        """What this directory holds, as its node reports it to rank 0: each step's :meth:`NodeRecord.summary`."""
        found = {}
        for step in self.steps():
            record = self.record(step)
            if record is not None:
                found[step] = record.summary()
        return found

    def is_pending(self, step: int, run: str) -> bool:
        """Whether save ``run`` of ``step`` left its directory here, not renamed into place."""
        return run.startswith(f"{TEMP_MARKER}save.{step_name(step)}-") and "/" not in run \
            and os.path.isdir(os.path.join(self.root, run))

    def roll_forward(self, step: int, run: str, root_xxh3: str) -> bool:
        """Commit ``step`` from the finished directory its save ``run`` left (record and root written, not yet
        renamed into place when the job died); whether it did."""
        if not self.is_pending(step, run):
            return False
        directory = os.path.join(self.root, run)
        try:
            with open(os.path.join(directory, NODE_RECORD), "rb") as file:
                record = NodeRecord.from_bytes(file.read(64 << 20), self.url, f"{run}/{NODE_RECORD}", step)
            if record.run != run or record.root.xxh3 != root_xxh3 or \
                    os.path.getsize(os.path.join(directory, MANIFEST)) != record.root.size:
                return False
            os.rename(directory, os.path.join(self.root, step_name(step)))
        except (OSError, FormatError):
            return False
        if self.durable:
            fsync_dir(self.root)
        return True

    def read_root(self, step: int, entry: FileEntry) -> bytes:
        """The root manifest of ``step`` here, checked against ``entry``."""
        return self.read(step, MANIFEST, entry)


def read_written(writer: LocalStepWriter, key: str) -> bytes:
    """The bytes of file ``key`` as ``writer`` wrote it (not yet committed)."""
    try:
        with open(os.path.join(writer.directory, key), "rb") as file:
            return file.read()
    except OSError as exc:
        raise CheckpointError(f"{writer.tier.label}: cannot read back {key!r} of step {writer.step}: {exc}") from exc
