"""Each tier's own manifest of a step, read once, and the first tier that can say what a file holds."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

from trainio.storage import CheckpointError, FormatError, StoreError

from .._format.manifest import FileEntry, Manifest
from .._format.parts import pack_member
from .._tiers.commit import TierIO, describe

T = TypeVar("T")


def first_manifest(tiers: list[TierIO], step: int) -> tuple[TierIO, Manifest]:
    """The manifest of ``step`` from the first tier whose copy is valid."""
    problems = []
    for tier in tiers:
        try:
            return tier, tier.manifest(step)
        except (StoreError, FormatError, CheckpointError) as exc:
            problems.append(f"{tier.label}: {describe(exc)}")
    raise CheckpointError(f"step {step}: no tier has a readable manifest: " + "; ".join(problems))


def _same_state(a: Manifest, b: Manifest) -> bool:
    """Whether two tiers' manifests describe the same files (the same parts: where ranked chunks lie in the packs)."""
    return a.tree == b.tree and a.arrays == b.arrays and a.pack == b.pack and a.parts == b.parts


class TierManifests:
    """The manifests of one step on ``tiers``: the one restored from (:attr:`manifest`, of :attr:`source`, the first
    tier whose copy is valid), and each tier's own, which that tier's files are checked against. Thread-safe.

    Raises:
        CheckpointError: no tier has a readable manifest of the step.
    """

    def __init__(self, tiers: list[TierIO], step: int) -> None:
        self.tiers, self.step = tiers, step
        self.source, self.manifest = first_manifest(tiers, step)
        self._manifests: dict[int, Manifest | CheckpointError] = {id(self.source): self.manifest}
        self._lock = threading.Lock()

    def own(self, tier: TierIO) -> Manifest:
        """``tier``'s own manifest of the step, read once.

        Raises:
            CheckpointError: it cannot be read, or it describes another state than the manifest restored from.
        """
        with self._lock:
            known = self._manifests.get(id(tier))
            if known is None:
                try:
                    known = tier.manifest(self.step)
                    if not _same_state(known, self.manifest):
                        known = CheckpointError(f"its manifest of step {self.step} describes another state than "
                                                f"{self.source.label}'s")
                except (StoreError, FormatError, CheckpointError) as exc:
                    known = CheckpointError(f"manifest: {describe(exc)}")
                self._manifests[id(tier)] = known
        if isinstance(known, CheckpointError):
            raise known
        return known

    def entry(self, key: str) -> FileEntry:
        """The size and digest of file ``key``, from the first tier whose own manifest (and part) lists it."""
        return self._first_listed(lambda files: files[key], f"its manifest lists no file {key!r}",
                                  f"what file {key!r} holds")

    def member(self, key: str) -> tuple[str, int, int]:
        """Where chunk ``key`` of a ranked array lies: from the first tier whose own manifest's parts say so."""
        return self._first_listed(lambda files: pack_member(files, key),
                                  f"its parts list no chunk {key!r} in a rank's pack", f"where chunk {key!r} lies")

    def _first_listed(self, find: Callable[[Mapping[str, FileEntry]], T], missing: str, what: str) -> T:
        """``find`` in the files of the first tier whose own manifest (and parts) can answer: one that raises
        KeyError lacks it (``missing``); an error names ``what`` could not be found."""
        problems = []
        for tier in self.tiers:
            try:
                return find(self.own(tier).files)
            except KeyError:
                problems.append(f"{tier.label}: {missing}")
            except (StoreError, OSError, CheckpointError) as exc:
                problems.append(f"{tier.label}: {describe(exc)}")
        raise CheckpointError(f"step {self.step}: no tier can say {what}: " + "; ".join(problems))
