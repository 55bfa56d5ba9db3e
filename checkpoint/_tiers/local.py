"""Checkpoint steps in a local directory: temp directory, fsync, rename."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Mapping

import numpy as np

from trainio.storage import (
    TEMP_MARKER,
    CheckpointError,
    Hasher,
    IntegrityError,
    Store,
    StoreError,
    TrainioError,
    fsync_dir,
    start_writeback,
    sync_files,
    temp_name,
    temp_owner_is_dead,
)

from .._format.manifest import MANIFEST, FileEntry
from .commit import StepWriter, TierIO, size_error, step_name
from .pack_members import PackMember, PackMembers

WRITEBACK_BYTES = 1 << 20
"""Files at least this big have their write-back started as soon as they are written (the disk writes them while
the next ones are made); every file is made durable at the commit, all together."""

_READ_PIECE = 256 << 10  # a file is read this much a call, and each piece hashed while it is in the CPU's cache.
#                         Sequential calls let the kernel read ahead of the next, while a whole chunk read in one
#                         call leaves the disk idle while its thread hashes it. 2 ranks, cold, medians of 14-16
#                         rounds in turn: 256 KiB 1.04-1.11x the raw read's time; 1 MiB 1.07-1.16x; 8 MiB 1.34x.
_write = os.write  # one name for every data write, so tests can make the disk run full
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}


class _Span:
    """One pass through a file from its start, each piece hashed while it is in the CPU's cache."""

    def __init__(self, fd: int, url: str, full: str, entry: FileEntry) -> None:
        self.fd, self.url, self.full, self.entry = fd, url, full, entry
        self.at = 0
        self.hasher = Hasher()
        self._scratch: memoryview | None = None

    def read(self, into: memoryview) -> None:
        """Read the next ``into.nbytes`` bytes into ``into``.

        Raises:
            IntegrityError: the file ends before them.
        """
        done = 0
        while done < into.nbytes:
            piece = into[done:done + _READ_PIECE]
            n = os.preadv(self.fd, [piece], self.at)
            if n == 0:
                raise size_error(self.url, self.full, self.entry, self.at)
            self.hasher.update(piece[:n])  # while the piece is still in the CPU's cache
            done += n
            self.at += n

    def skip(self, to: int) -> None:
        """Read (and hash) the bytes up to offset ``to`` without keeping them."""
        if self.at < to and self._scratch is None:
            self._scratch = np.empty(_READ_PIECE, np.uint8).data
        while self.at < to:
            assert self._scratch is not None
            self.read(self._scratch[:to - self.at])

    def check(self, size: int) -> None:
        """Read the rest of the file's ``size`` bytes and compare the whole file's digest with its entry's.

        Raises:
            IntegrityError: the file is shorter, or its digest differs.
        """
        self.skip(size)
        actual = self.hasher.hexdigest()
        if actual != self.entry.xxh3:
            raise IntegrityError(self.url, self.full, self.entry.xxh3, actual)


def _temp_dir_name(kind: str, step: int) -> str:
    return temp_name(f"{kind}.{step_name(step)}")


class LocalStepWriter(StepWriter):
    """Writes a step into ``.trainio-tmp.save.<step>-<host>-<pid>-<rand>/`` and renames it on commit."""

    tier: LocalTierIO

    def __init__(self, tier: LocalTierIO, step: int, shared: str | None = None) -> None:
        self.tier = tier
        self.step = step
        os.makedirs(tier.root, exist_ok=True)
        if shared is None:
            self._dir = os.path.join(tier.root, _temp_dir_name("save", step))
            os.mkdir(self._dir)
        else:
            if not shared.startswith(f"{TEMP_MARKER}save.{step_name(step)}-") or "/" in shared:
                raise CheckpointError(f"{tier.label}: {shared!r} is not a temp directory name of step {step}")
            self._dir = os.path.join(tier.root, shared)
            os.makedirs(self._dir, exist_ok=True)
        self._unsynced: list[str] = []

    @property
    def directory(self) -> str:
        """The temp directory the step is written into."""
        return self._dir

    def flush(self) -> None:
        if self.tier.durable:
            sync_files(self._dir, self._unsynced)
            self._unsynced = []

    def prepare(self, keys: list[str]) -> None:
        for directory in sorted({os.path.dirname(k) for k in keys} - {""}):
            os.makedirs(os.path.join(self._dir, directory), exist_ok=True)

    def write(self, key: str, data: memoryview, size: int) -> None:
        try:
            self._write(key, data, size)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise StoreError(self.tier.url, f"{step_name(self.step)}/{key}", f"cannot write: {exc.strerror or exc}",
                             "the tier is full: free space, or keep fewer steps" if full else "") from exc

    def _write(self, key: str, data: memoryview, size: int) -> None:
        path = os.path.join(self._dir, key)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            written = 0
            while written < data.nbytes:
                written += _write(fd, data[written:])
            if size > data.nbytes:
                os.ftruncate(fd, size)
            if self.tier.durable and size >= WRITEBACK_BYTES:
                start_writeback(fd)
        finally:
            os.close(fd)
        self._unsynced.append(path)

    def link(self, step: int, key: str) -> None:
        source = os.path.join(self.tier.root, step_name(step), key)
        target = os.path.join(self._dir, key)
        try:
            os.link(source, target)
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            shutil.copyfile(source, target)
            self._unsynced.append(target)

    def _misplaced(self, files: Mapping[str, FileEntry]) -> list[str]:
        wrong = []
        for key, entry in files.items():
            try:
                size = os.stat(os.path.join(self._dir, key)).st_size
            except FileNotFoundError:
                wrong.append(f"{key} (missing)")
                continue
            if size != entry.size:
                wrong.append(f"{key} ({size} bytes, written {entry.size})")
        return wrong

    def _publish(self, manifest: bytes) -> None:
        self.flush()
        path = os.path.join(self._dir, MANIFEST)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, manifest)
            if self.tier.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if self.tier.durable:
            fsync_dir(self._dir)
        final = os.path.join(self.tier.root, step_name(self.step))
        if os.path.lexists(final) and os.path.exists(os.path.join(final, MANIFEST)):
            self.tier._refuse_committed(self.step)
        try:
            os.rename(self._dir, final)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise CheckpointError(f"{self.tier.label}: {final} already exists and is not a committed step; "
                                      "remove it by hand") from None
            raise
        if self.tier.durable:
            fsync_dir(self.tier.root)

    def abort(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


class LocalTierIO(TierIO):
    """Steps as directories under the root of a store whose keys are local files."""

    def __init__(self, store: Store, label: str, root: str) -> None:
        super().__init__(store, label)
        self.root = root
        self.durable = store.durable

    def _step_dirs(self) -> list[str]:
        try:
            with os.scandir(self.root) as entries:
                return [e.name for e in entries if len(e.name) == 12 and e.name.isdigit()
                        and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def is_committed(self, step: int) -> bool:
        return os.path.isfile(os.path.join(self.root, step_name(step), MANIFEST))

    def writer(self, step: int, shared: str | None = None) -> LocalStepWriter:
        self._refuse_committed(step)
        return LocalStepWriter(self, step, shared)

    def shared_name(self, step: int) -> str | None:
        return _temp_dir_name("save", step)

    def _open_checked(self, full: str, entry: FileEntry) -> int:
        """A descriptor on the regular file ``full`` inside the tier, whose size is the manifest's."""
        fd = self.store.open_local(full)
        assert fd is not None, "a local tier's store keeps local files"
        size = os.fstat(fd).st_size
        if size != entry.size:
            os.close(fd)
            raise size_error(self.url, full, entry, size)
        return fd

    def read_into(self, step: int, key: str, entry: FileEntry, target: memoryview) -> None:
        full = f"{step_name(step)}/{key}"
        fd = self._open_checked(full, entry)
        try:
            self._read_checked(fd, full, entry, target)
        finally:
            os.close(fd)

    def read_members(self, step: int, key: str, entry: FileEntry, members: PackMembers) -> None:
        if not members.disjoint:
            super().read_members(step, key, entry, members)
            return
        full = f"{step_name(step)}/{key}"
        fd = self._open_checked(full, entry)
        span = _Span(fd, self.url, full, entry)
        held: list[tuple[PackMember, memoryview]] = []  # sinks' bytes, handed on once the pack is found good
        try:
            for member in members.members:
                span.skip(member.offset)
                if member.target is not None:
                    span.read(member.target[:member.size])
                else:
                    held.append((member, memoryview(bytearray(member.size))))
                    span.read(held[-1][1])
                span.skip(member.offset + member.size)
            span.check(entry.size)
        finally:
            os.close(fd)
        for member, data in held:
            assert member.sink is not None
            member.sink(data)

    def _read_checked(self, fd: int, full: str, entry: FileEntry, target: memoryview) -> None:
        span = _Span(fd, self.url, full, entry)
        span.read(target)
        span.check(entry.size)

    def advise(self, step: int, keys: list[str]) -> None:
        for key in keys:
            try:
                fd = self.store.open_local(f"{step_name(step)}/{key}")  # regular files inside the tier only
            except (TrainioError, OSError):
                continue  # missing or refused: its read says so
            assert fd is not None, "a local tier's store keeps local files"
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # a file system without the advice: read as it comes
            finally:
                os.close(fd)

    def local_file(self, step: int, key: str) -> str | None:
        path = self.store.local_path(f"{step_name(step)}/{key}")
        if path is None:
            return None
        real, root = os.path.realpath(path), os.path.realpath(self.root)
        return real if real.startswith(root + os.sep) else None  # no link is followed out of the tier

    def read(self, step: int, key: str, entry: FileEntry) -> bytes:
        full = f"{step_name(step)}/{key}"
        fd = self._open_checked(full, entry)  # the size is checked before memory is given to it
        try:
            data = bytearray(entry.size)
            self._read_checked(fd, full, entry, memoryview(data))
        finally:
            os.close(fd)
        return data  # type: ignore[return-value]  # a bytearray: no second copy of a 32 MiB chunk

    def delete(self, step: int) -> None:
        source = os.path.join(self.root, step_name(step))
        doomed = os.path.join(self.root, _temp_dir_name("delete", step))
        try:
            os.rename(source, doomed)
        except FileNotFoundError:
            return
        if self.durable:
            fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def debris(self) -> list[str]:
        try:
            with os.scandir(self.root) as entries:
                return sorted(e.name for e in entries if temp_owner_is_dead(e.name))
        except FileNotFoundError:
            return []

    def remove_debris(self, name: str) -> None:
        if not name.startswith(TEMP_MARKER) or "/" in name:
            raise StoreError(self.url, name, "not a temp name")
        path = os.path.join(self.root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
