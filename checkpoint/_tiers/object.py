"""Checkpoint steps in an object store: data first, then the manifest, create-only."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from trainio.storage import AlreadyExists, CheckpointError, NotFound

from .._format.manifest import MANIFEST, FileEntry
from .commit import StepWriter, TierIO, step_name

_CHECK_THREADS = 16
"""Parallel size requests when a writer checks its files before committing."""


class ObjectStepWriter(StepWriter):
    """Uploads a step's files under ``<step>/``, then its manifest with ``If-None-Match: *``."""

    tier: ObjectTierIO

    def __init__(self, tier: ObjectTierIO, step: int) -> None:
        self.tier = tier
        self._prefix = step_name(step)
        self.step = step

    def write(self, key: str, data: memoryview, size: int) -> None:
        body: memoryview | bytes = data
        if size > data.nbytes:
            body = bytes(data) + bytes(size - data.nbytes)
        self.tier.store.put(f"{self._prefix}/{key}", body)

    def link(self, step: int, key: str) -> None:
        self.tier.store.copy(f"{step_name(step)}/{key}", f"{self._prefix}/{key}")

    def _misplaced(self, files: Mapping[str, FileEntry]) -> list[str]:
        def check(item: tuple[str, FileEntry]) -> str:
            key, entry = item
            try:
                size = self.tier.store.size(f"{self._prefix}/{key}")
            except NotFound:
                return f"{key} (missing)"
            return "" if size == entry.size else f"{key} ({size} bytes, written {entry.size})"

        with ThreadPoolExecutor(_CHECK_THREADS) as pool:
            return [problem for problem in pool.map(check, files.items()) if problem]

    def _publish(self, manifest: bytes) -> None:
        try:
            self.tier.store.put(f"{self._prefix}/{MANIFEST}", manifest, overwrite=False)
        except AlreadyExists:
            raise CheckpointError(f"{self.tier.label}: step {self.step} was committed by another writer "
                                  "while this one uploaded it; its manifest stands") from None

    def abort(self) -> None:
        if not self.tier.is_committed(self.step):
            self.tier.store.delete_prefix(self._prefix)

class ObjectTierIO(TierIO):
    """Steps as ``<step>/`` prefixes of an object store (or any :class:`Store`)."""

    def writer(self, step: int, shared: str | None = None) -> ObjectStepWriter:
        self._refuse_committed(step)
        return ObjectStepWriter(self, step)

    def delete(self, step: int) -> None:
        self.store.delete(f"{step_name(step)}/{MANIFEST}")
        self.store.delete_prefix(step_name(step))

    def debris(self) -> list[str]:
        committed = set(self.steps())
        return sorted(name for name in self._step_dirs() if int(name) not in committed)

    def remove_debris(self, name: str) -> None:
        if int(name) in self.steps():
            raise CheckpointError(f"{self.label}: step {name} is committed, not debris")
        self.store.delete_prefix(name)

