"""The commit protocol of a checkpoint step on one tier, and how a step is read from and removed from it.

Two kinds: local directories (a node's NVMe, a mounted parallel file system),
where a step is written into a temp directory and renamed on commit, and
object stores, where data goes up first and the manifest last, create-only.

Writing a step, in this order (the save protocol in ``_save/protocol.py``
drives it; a promotion or a single process is a world of one):

1. rank 0: :meth:`TierIO.shared_name` names the step's writers (one temp
   directory on a shared file system), sent to every rank with the plan;
2. every rank: :meth:`TierIO.writer` opens its writer of the step, which
   refuses a step already committed;
3. every rank: :meth:`StepWriter.prepare` with the keys it will write, then
   :meth:`StepWriter.write` (or :meth:`StepWriter.link` for a file equal to
   the previous step's) for each of its files, from a pool of threads;
4. every rank: :meth:`StepWriter.flush` makes its files durable, and it
   reports them (size and xxh3-128) to rank 0;
5. rank 0: :meth:`StepWriter.commit` with the manifest of every rank's files:
   it checks the tier's lease and that every file is in place with its size,
   then writes the manifest, last (the step becomes visible);
6. rank 0, if any rank failed or the commit was refused:
   :meth:`StepWriter.abort` removes what was written (never a committed step).

Readers never take part: a step without a manifest does not exist for them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from trainio.storage import (
    MAX_DOCUMENT_BYTES,
    CheckpointError,
    FormatError,
    Hasher,
    IntegrityError,
    NotFound,
    Store,
    StoreError,
    load_sealed,
    seal_json,
)

from .._format.manifest import MANIFEST, FileEntry, Manifest
from .._format.names import step_name as step_name  # where the tiers and the save find it
from .lease import Lease
from .pack_members import PackMembers

_STEP_NAME = re.compile(r"\d{12}")
LAST_KNOWN_GOOD = "last_known_good.json"
"""Key, at the top of a tier, of the newest step that passed a full verification."""
ADVISE_BELOW = 1 << 20
"""Files smaller than this are worth :meth:`TierIO.advise` before a restore reads them: the kernel reads such a file
in one request anyway. A bigger file is better left to the read-ahead its own reads start, which fills the page cache
with large folios; the advice fills it with single pages, slower to copy now and when read again (measured on 4 MiB
files: a cold read 1.4x as long, a warm read after it 1.2x)."""


def digest_with_padding(data: memoryview, size: int) -> str:
    """The xxh3-128 of ``data`` followed by zeros up to ``size`` bytes."""
    hasher = Hasher()
    hasher.update(data)
    if size > data.nbytes:
        hasher.update(np.zeros(size - data.nbytes, np.uint8).data)
    return hasher.hexdigest()


def size_error(url: str, key: str, entry: FileEntry, actual: int) -> IntegrityError:
    """The error for a file whose size is not the manifest's."""
    return IntegrityError(url, key, entry.xxh3, f"(a file of {actual} bytes)",
                          f"the manifest says {entry.size} bytes; the file was truncated or replaced")


class StepWriter(ABC):
    """Writes one step's files; nothing is visible to readers until :meth:`commit`."""

    tier: TierIO
    step: int

    @abstractmethod
    def write(self, key: str, data: memoryview, size: int) -> None:
        """Write the file ``key``: ``data`` then zeros up to ``size`` bytes."""

    @abstractmethod
    def link(self, step: int, key: str) -> None:
        """Make ``key`` share the bytes of the same key in committed ``step`` of this tier."""

    def commit(self, manifest: bytes, files: Mapping[str, FileEntry]) -> None:
        """Make the step durable and visible, manifest last.

        Before the manifest is written, the writer checks that it still holds
        the tier's lease (when the tier has one) and that every file of
        ``files`` is in place with its size: a step whose files another
        process removed is never committed.

        Raises:
            CheckpointError: the step is already committed on this tier, the
                lease was lost, or a file is missing or of another size.
        """
        if self.tier.lease is not None:
            self.tier.lease.check()
        self.check(files)
        self._publish(manifest)

    def check(self, files: Mapping[str, FileEntry]) -> None:
        """Raise unless every file of ``files`` is in place with its size.

        Raises:
            CheckpointError: a file is missing or of another size (another process removed it?).
        """
        wrong = self._misplaced(files)
        if wrong:
            raise CheckpointError(f"{self.tier.label}: step {self.step} was not committed: {len(wrong)} of its "
                                  f"files are missing or of another size than written, e.g. {wrong[0]} (another "
                                  "process removed them?)")

    @abstractmethod
    def _misplaced(self, files: Mapping[str, FileEntry]) -> list[str]:
        """The files of ``files`` that are not in place with their size, each described."""

    @abstractmethod
    def _publish(self, manifest: bytes) -> None:
        """Write the manifest and make the step visible."""

    @abstractmethod
    def abort(self) -> None:
        """Remove what was written; a committed step is never touched."""

    def prepare(self, keys: list[str]) -> None:  # noqa: B027 - only directory tiers need it
        """Get ready to write ``keys`` (e.g. make their directories)."""

    def flush(self) -> None:  # noqa: B027 - object stores hold what they acknowledged
        """Make this writer's files durable (a rank's share of a multi-rank step, before rank 0 commits)."""


class TierIO(ABC):
    """The steps of one tier: list, read, write, delete."""

    def __init__(self, store: Store, label: str) -> None:
        self.store = store
        self.label = label
        self.lease: Lease | None = None
        """The lease a writing manager holds on this tier; its commits check it."""

    @property
    def url(self) -> str:
        """The tier's URL."""
        return self.store.url

    def steps(self) -> list[int]:
        """The committed steps, oldest first."""
        names: list[str] = self._step_dirs()
        return sorted(int(name) for name in names if self.is_committed(int(name)))

    def _step_dirs(self) -> list[str]:
        return [name for name in self.store.list_dirs() if _STEP_NAME.fullmatch(name)]

    def is_committed(self, step: int) -> bool:
        """Whether ``step`` has a manifest on this tier."""
        return self.store.exists(f"{step_name(step)}/{MANIFEST}")

    def manifest(self, step: int) -> Manifest:
        """The validated manifest of ``step``.

        Raises:
            NotFound: the step is not committed here.
            FormatError: the manifest is malformed.
        """
        key = f"{step_name(step)}/{MANIFEST}"
        size = self.store.size(key)
        if size > MAX_DOCUMENT_BYTES:
            raise FormatError(self.url, key, f"is {size} bytes, more than the {MAX_DOCUMENT_BYTES} a manifest may have")
        manifest = Manifest.from_bytes(self.store.get(key), self.url, key)
        if manifest.step != step:
            raise CheckpointError(f"{self.url}: {key!r} is the manifest of step {manifest.step}, "
                                  f"not {step}; the directory was renamed by hand")
        return manifest.bind(lambda part, entry: self.read(step, part, entry), self.url)

    def read_into(self, step: int, key: str, entry: FileEntry, target: memoryview) -> None:
        """Fill ``target`` with the first bytes of the file ``key``, checking the whole file.

        Raises:
            NotFound: the file is missing.
            IntegrityError: its size or digest differs from ``entry``.
        """
        data = self.read(step, key, entry)
        target[:] = memoryview(data)[:target.nbytes]

    def read_members(self, step: int, key: str, entry: FileEntry, members: PackMembers) -> None:
        """Put the ``members`` of the rank pack ``key`` where they go, checking the whole pack.

        Raises:
            NotFound: the pack is missing.
            IntegrityError: its size or digest differs from ``entry``.
        """
        members.fill(memoryview(self.read(step, key, entry)))

    def local_file(self, step: int, key: str) -> str | None:
        """The path of the local file holding ``key`` of ``step`` where this tier keeps local files, else None."""
        return None

    def advise(self, step: int, keys: list[str]) -> None:
        """Tell the tier that the files ``keys`` of ``step`` will be read soon: a tier of local files has the kernel
        start reading them into memory. Nothing is checked or reported here; the reads that follow do that."""
        return None  # a store of objects has no page cache to fill

    def source_of(self, key: str) -> str:
        """Where a read of ``key`` comes from, as a restore's report counts it (a tier: its name)."""
        return self.label

    def read(self, step: int, key: str, entry: FileEntry) -> bytes:
        """The whole file ``key`` of ``step``, checked against ``entry``."""
        full = f"{step_name(step)}/{key}"
        data = self.store.get(full)
        if len(data) != entry.size:
            raise size_error(self.url, full, entry, len(data))
        actual = digest_with_padding(memoryview(data), entry.size)
        if actual != entry.xxh3:
            raise IntegrityError(self.url, full, entry.xxh3, actual)
        return data

    def verify(self, step: int, key: str, entry: FileEntry) -> None:
        """Re-read the file ``key`` of ``step`` and check its size and digest."""
        full = f"{step_name(step)}/{key}"
        size = self.store.size(full)
        if size != entry.size:
            raise size_error(self.url, full, entry, size)
        self.store.verify(full, entry.xxh3)

    def repair_file(self, step: int, key: str, data: bytes) -> None:
        """Replace the file ``key`` of committed ``step`` with good bytes, atomically."""
        self.store.put(f"{step_name(step)}/{key}", data)

    def last_known_good(self) -> int | None:
        """The newest step that passed a full verification here, if recorded."""
        try:
            value = load_sealed(self.store.get(LAST_KNOWN_GOOD), self.url, LAST_KNOWN_GOOD, max_bytes=4096).get("step")
        except (StoreError, FormatError, AttributeError):
            return None
        return value if type(value) is int else None

    def mark_known_good(self, step: int) -> None:
        """Record ``step`` as verified, unless a newer step already is."""
        current = self.last_known_good()
        if current == step or (current is not None and step < current and current in self.steps()):
            return  # recorded already (a restore of the same step again writes nothing), or a newer one is
        self.store.put(LAST_KNOWN_GOOD, seal_json({"format": "trainio.last_known_good", "step": step}))

    @abstractmethod
    def writer(self, step: int, shared: str | None = None) -> StepWriter:
        """A writer for a new ``step``; ranks of one multi-rank save pass the same ``shared`` name.

        Raises:
            CheckpointError: the step is already committed here.
        """

    def shared_name(self, step: int) -> str | None:
        """The name every rank's writer of a multi-rank save of ``step`` is given (chosen by rank 0)."""
        return None

    @abstractmethod
    def delete(self, step: int) -> None:
        """Remove ``step``: first from readers' view, then its bytes."""

    @abstractmethod
    def debris(self) -> list[str]:
        """Leftovers of writers that died (names under the tier), safe to remove."""

    @abstractmethod
    def remove_debris(self, name: str) -> None:
        """Remove one name :meth:`debris` returned."""

    def _refuse_committed(self, step: int) -> None:
        if self.is_committed(step):
            raise CheckpointError(f"{self.label}: step {step} is already committed; "
                                  "checkpoint steps are never overwritten (delete it first, or save another step)")


class NotKeptHere(NotFound):
    """The tier does not keep this file, by design: a node's directory holds only some parts of a step.

    A restore reads such a file from the next tier without calling it a fall-back.
    """


def describe(exc: BaseException) -> str:
    """A one-line account of ``exc``: its message, prefixed by its type unless it is one of ours."""
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {text}"
