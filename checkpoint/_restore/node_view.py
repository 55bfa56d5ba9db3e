"""A node tier as one rank reads a step from it: its own node's directory, and the files peers sent it."""

from __future__ import annotations

from trainio.storage import CheckpointError, IntegrityError, NotFound, digest

from .._format.manifest import MANIFEST, FileEntry, Manifest
from .._format.parts import PARTS, StepFiles
from .._tiers.commit import NotKeptHere, StepWriter, TierIO, size_error, step_name
from .._tiers.node_tier import NodeTierIO

ROOT_PART = -1
"""The part that :meth:`NodeView.part_of` names for the root's own files (metadata, the pack)."""


class NodeView(TierIO):
    """Step ``step`` of a node tier as this rank sees it: read-only, every file checked.

    A file is read from this node's directory when its record says the
    directory holds that file's part, else from the files peers sent
    (:attr:`fetched`); any other file is missing here, and the restore reads
    it from the next tier.
    """

    def __init__(self, io: NodeTierIO, step: int, root: bytes, parts: set[int], root_files: bool) -> None:
        super().__init__(io.store, io.label)
        self.io = io
        self.step = step
        self.parts = parts
        self.root_files = root_files
        self.fetched: dict[str, bytes] = {}
        self.document = root
        self._root = Manifest.from_bytes(root, io.url, f"{step_name(step)}/{MANIFEST}")
        if self._root.step != step or self._root.parts is None:
            raise CheckpointError(f"{io.label}: the root manifest sent for step {step} is of step {self._root.step} "
                                  "or has no parts")
        self._bound = self._root.bind(lambda key, entry: self.read(step, key, entry), io.url)

    @property
    def root(self) -> Manifest:
        """The step's root manifest, its parts read through this view."""
        return self._bound

    def part_of(self, key: str) -> int | None:
        """The part (a rank, or :data:`ROOT_PART`) whose files include ``key``; None for a key of no part."""
        if key in self._root.files:
            return ROOT_PART
        if key.startswith(f"{PARTS}/"):
            try:
                return int(key[len(PARTS) + 1:].removesuffix(".json"))
            except ValueError:
                return None
        files = self._bound.files
        assert isinstance(files, StepFiles)
        return files.writer(key)

    def held_here(self, key: str) -> bool:
        """Whether this node's directory holds ``key``'s part."""
        part = self.part_of(key)
        return self.root_files if part == ROOT_PART else part in self.parts

    def source_of(self, key: str) -> str:
        return "peers" if key in self.fetched else "node"

    def is_committed(self, step: int) -> bool:
        return step == self.step

    def steps(self) -> list[int]:
        return [self.step]

    def manifest(self, step: int) -> Manifest:
        if step != self.step:
            raise NotFound(self.url, f"{step_name(step)}/{MANIFEST}", "not the step this restore reads")
        return self._bound

    def read(self, step: int, key: str, entry: FileEntry) -> bytes:
        data = self.fetched.get(key)
        if data is None:
            if not self.held_here(key):
                raise NotKeptHere(self.url, f"{step_name(step)}/{key}", "no node of the job holds it")
            return self.io.read(step, key, entry)
        full = f"{step_name(step)}/{key}"
        if len(data) != entry.size:
            raise size_error(f"{self.url} (sent by a peer)", full, entry, len(data))
        actual = digest(data)
        if actual != entry.xxh3:
            raise IntegrityError(f"{self.url} (sent by a peer)", full, entry.xxh3, actual)
        return data

    def repair_file(self, step: int, key: str, data: bytes) -> None:
        if not self.held_here(key):
            raise NotKeptHere(self.url, f"{step_name(step)}/{key}", "this node does not keep it")
        self.io.repair_file(step, key, data)

    def writer(self, step: int, shared: str | None = None) -> StepWriter:
        raise CheckpointError(f"{self.label}: a restore's view of a node tier is read-only")

    def delete(self, step: int) -> None:
        raise CheckpointError(f"{self.label}: a restore's view of a node tier is read-only")

    def debris(self) -> list[str]:
        return []

    def remove_debris(self, name: str) -> None:
        raise CheckpointError(f"{self.label}: a restore's view of a node tier is read-only")
