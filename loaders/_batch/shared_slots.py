"""Shared-memory staging slots: where transform worker processes write batches that the trainer reads in place."""

from __future__ import annotations

import glob
import itertools
import mmap
import os
import tempfile
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from .gather import stack_rows
from .row_hash import RowMismatch
from .staging import Lease, aligned

_DIRECTORY = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_PREFIX = "trainio-slot-"
_numbers = itertools.count()


class SharedSlot:
    """A file in shared memory (``/dev/shm``) mapped by the trainer and its workers; its maker removes it.

    Made with ``nbytes`` (a new file, named after this process) or opened
    by ``name``. Plain files, not ``multiprocessing.shared_memory``, whose
    resource tracker would unlink a segment under the process that made it.
    """

    def __init__(self, nbytes: int | None = None, *, name: str | None = None) -> None:
        if name is None:
            assert nbytes is not None
            name = f"{_PREFIX}{os.getpid()}-{next(_numbers)}"
            path = os.path.join(_DIRECTORY, name)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                if hasattr(os, "posix_fallocate"):  # claimed now: a full /dev/shm is an error here, not a SIGBUS later
                    os.posix_fallocate(fd, 0, max(1, nbytes))
                else:
                    os.ftruncate(fd, max(1, nbytes))
            except OSError as exc:
                os.close(fd)
                os.unlink(path)
                raise OSError(exc.errno, f"cannot make a shared-memory slot of {nbytes} bytes in {_DIRECTORY} "
                                         f"({exc.strerror}): give the container more shared memory (docker "
                                         "--shm-size), or lower the Loader's slot_bytes") from exc
            self.owner = True
        else:
            fd = os.open(os.path.join(_DIRECTORY, name), os.O_RDWR)
            self.owner = False
        try:
            self.nbytes = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, self.nbytes)
        finally:
            os.close(fd)
        self.name = name
        self.array = np.frombuffer(self._map, dtype=np.uint8)

    def close(self) -> None:
        """Remove it where it was made; the mapping goes once no array views it any more."""
        if self.owner:
            try:
                os.unlink(os.path.join(_DIRECTORY, self.name))
            except FileNotFoundError:
                pass
            self.owner = False


def remove_orphans() -> None:
    """Remove slot files left by trainer processes that no longer run (killed before they could)."""
    for path in glob.glob(os.path.join(_DIRECTORY, f"{_PREFIX}*")):
        pid = os.path.basename(path)[len(_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                os.unlink(path)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


Column = list[np.ndarray] | np.ndarray
"""A batch's field: the samples' arrays (one shape and dtype), to be stacked, or one array, copied as it is."""


def _shape(column: Column) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """The shape, dtype and bytes of ``column`` once in the slot."""
    if isinstance(column, np.ndarray):
        return column.shape, column.dtype, column.nbytes
    return (len(column), *column[0].shape), column[0].dtype, len(column) * column[0].nbytes


def write_columns(slot: SharedSlot, columns: dict[str, Column], digests: Mapping[str, np.ndarray] | None = None
                  ) -> list[tuple[str, str, tuple[int, ...], int]]:
    """Stack (or copy) each column into ``slot``, the columns end to end (64-byte aligned); where each lies:
    (name, dtype, shape, offset). A stacked column named in ``digests`` has each sample's array checked against
    its digest (XXH3-64 of its bytes, one per sample) as it is copied.

    Raises:
        ValueError: they do not fit (the caller makes a larger slot).
        RowMismatch: a sample's array does not match its digest (its ``field`` the column's name).
    """
    layout = []
    offset = 0
    for name, column in columns.items():
        shape, dtype, size = _shape(column)
        offset = aligned(offset)
        end = offset + size
        if end > slot.nbytes:
            raise ValueError(f"{end} bytes do not fit the slot's {slot.nbytes}")
        target = slot.array[offset:end].view(dtype).reshape(shape)
        if isinstance(column, np.ndarray):
            np.copyto(target, column, casting="no")
        else:
            try:
                stack_rows(target, column, None if digests is None else digests.get(name))
            except RowMismatch as mismatch:
                raise RowMismatch(mismatch.index, mismatch.expected, mismatch.actual, name) from None
        layout.append((name, dtype.str, shape, offset))
        offset = end
    return layout


def columns_bytes(columns: dict[str, Column]) -> int:
    """The slot size :func:`write_columns` needs for ``columns``."""
    offset = 0
    for column in columns.values():
        offset = aligned(offset) + _shape(column)[2]
    return offset


class SharedRing:
    """The trainer's shared-memory slots, lent one per batch and back once every array of that batch has died.

    A slot that is too small is replaced by the larger one a worker made
    (:meth:`adopt`); :meth:`take` makes a new slot when none is free, so a
    consumer holding on to batches costs memory, never a deadlock.
    """

    def __init__(self, slot_bytes: int) -> None:
        self._slot_bytes = slot_bytes
        self._free: list[SharedSlot] = []
        self._slots: dict[str, SharedSlot] = {}
        self._lock = threading.Lock()

    def take(self) -> SharedSlot:
        """A free slot (a new one when every slot is lent)."""
        try:
            return self._free.pop()
        except IndexError:
            slot = SharedSlot(self._slot_bytes)
            with self._lock:
                self._slots[slot.name] = slot
            return slot

    def give_back(self, slot: SharedSlot) -> None:
        """``slot`` is free again (its batch was dropped unread)."""
        self._free.append(slot)

    def adopt(self, lent: SharedSlot, made: str) -> SharedSlot:
        """A worker wrote into a new file ``made`` instead of the too small ``lent``: it replaces ``lent``, and this
        process removes it when done."""
        slot = SharedSlot(name=made)
        slot.owner = True
        with self._lock:
            self._slots.pop(lent.name, None)
            self._slots[slot.name] = slot
            self._slot_bytes = max(self._slot_bytes, slot.nbytes)
        lent.close()
        return slot

    def arrays(self, slot: SharedSlot, layout: list[tuple[str, str, tuple[int, ...], int]]) -> dict[str, np.ndarray]:
        """The batch ``slot`` holds, as arrays viewing it; the slot is free again once they have all died."""
        lease = Lease(slot.array)
        memory = np.asarray(lease)
        arrays = {}
        for name, dtype, shape, offset in layout:
            kind = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64)) * kind.itemsize
            arrays[name] = memory[offset:offset + count].view(kind).reshape(shape)
        weakref.finalize(lease, self._free.append, slot)
        return arrays

    def close(self) -> None:
        """Unlink every slot (arrays still alive keep their memory until they die)."""
        with self._lock:
            slots, self._slots, self._free = list(self._slots.values()), {}, []
        for slot in slots:
            slot.close()

