"""Staging memory: the reusable slots batches are assembled in, and the ring that lends them to groups."""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

_ALIGN = 64


def aligned(offset: int) -> int:
    """``offset`` rounded up to the alignment every staged array starts at (64 bytes: a cache line)."""
    return -(-offset // _ALIGN) * _ALIGN


def aligned_empty(nbytes: int) -> np.ndarray:
    """``nbytes`` of plain memory from a 64-byte boundary, so that an aligned offset of it is a cache line.

    numpy's own memory starts 16 bytes past one: each row streamed into it
    would begin and end in a line shared with its neighbours (1.1 GB of
    8 KB rows copied row by row: 178-179 ms, 164-165 aligned).
    """
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % _ALIGN
    return raw[skip:skip + nbytes]


class Lease:
    """A group's claim on a staging buffer: every array carved for the group refers to it, and only to it.

    It dies once the last of those arrays (and every tensor made from them)
    is gone, which is when the buffer may be reused.
    """

    def __init__(self, buffer: np.ndarray) -> None:
        self.buffer = buffer
        self.__array_interface__ = {"data": (buffer.ctypes.data, False), "shape": (buffer.nbytes,),
                                    "typestr": "|u1", "version": 3}


class Staging:
    """One slot of the staging ring: a reusable buffer the arrays of a group of batches are carved from.

    ``allocate(nbytes)`` makes the raw buffer, starting on a 64-byte
    boundary: plain host memory (:func:`aligned_empty`), or pinned host
    memory when batches go to a CUDA device. A group that needs more
    than the buffer holds gets a new one, sized for the whole group and a
    quarter more, so its smaller arrays and the next group fit in it: each
    new buffer is memory touched for the first time. :meth:`leases` are the
    group's claims on its buffers; the slot is free again when they have
    all died.
    """

    def __init__(self, allocate: Callable[[int], np.ndarray]) -> None:
        self._allocate = allocate
        self._buffer = np.zeros(0, dtype=np.uint8)
        self._used = 0
        self._requested = 0
        self._carving: np.ndarray = self._buffer
        self._leases: list[Lease] = []

    def reset(self) -> None:
        """Start a new group: every array carved before is the consumer's no longer."""
        if self._requested > self._buffer.nbytes:
            self._buffer = self._allocate(self._requested + self._requested // 4)
        self._used = self._requested = 0
        self._lease(self._buffer)

    def _lease(self, buffer: np.ndarray) -> None:
        lease = Lease(buffer)
        self._leases.append(lease)
        self._carving = np.asarray(lease)

    def leases(self) -> list[Lease]:
        """The current group's leases, handed over once: the slot keeps no reference to them."""
        leases, self._leases = self._leases, []
        self._carving = self._buffer
        return leases

    def array(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype``, 64-byte aligned, from this slot's buffer."""
        need = math.prod(shape) * dtype.itemsize
        self._requested += need + _ALIGN
        start = aligned(self._used)
        if start + need > self._buffer.nbytes:  # with room for the group's smaller arrays (lengths, offsets) after it
            grown = max(need, self._requested)
            self._buffer = self._allocate(grown + grown // 4)
            self._lease(self._buffer)
            start = 0
        self._used = start + need
        return self._carving[start:start + need].view(dtype).reshape(shape)


class StagingRing:
    """The staging slots of one loader, kept from epoch to epoch; each is lent to one group at a time.

    A slot comes back once every array of its group has been released
    (:meth:`free_when_released`, for batches the consumer holds in host
    memory) or once the group's copy to the device has finished
    (:meth:`free_after`). :meth:`take` makes a new slot when none is free,
    so a consumer holding on to batches costs memory, never a deadlock.
    The slot freed last is lent first: it is the likeliest to be still in
    the CPU's cache.
    """

    def __init__(self, allocate: Callable[[int], np.ndarray]) -> None:
        self._allocate = allocate
        self._count = 0
        # list.append and list.pop are atomic, and take no lock a finalizer could be waiting on
        self._free: list[Staging] = []
        self._copies: list[tuple[Any, Staging]] = []
        self._lock = threading.Lock()

    def reserve(self, count: int) -> None:
        """Make sure at least ``count`` slots exist."""
        with self._lock:
            while self._count < count:
                self._free.append(Staging(self._allocate))
                self._count += 1

    def take(self) -> Staging:
        """A free slot (a new one when every slot is lent)."""
        self._reap()
        try:
            return self._free.pop()
        except IndexError:
            with self._lock:
                self._count += 1
            return Staging(self._allocate)

    def free_when_released(self, slot: Staging) -> None:
        """Take ``slot`` back once every array carved from it for the current group has died."""
        leases = slot.leases()
        if not leases:
            self._free.append(slot)
            return
        remaining = [len(leases)]
        lock = threading.Lock()

        def released() -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    self._free.append(slot)

        for lease in leases:
            weakref.finalize(lease, released)

    def free_after(self, event: Any, slot: Staging) -> None:
        """Take ``slot`` back once the device copy behind ``event`` (a CUDA event) has finished."""
        slot.leases()  # the copy's event, not the host arrays, says when the slot is free
        with self._lock:
            self._copies.append((event, slot))

    def _reap(self) -> None:
        with self._lock:
            if not self._copies:
                return
            still = []
            for event, slot in self._copies:
                if event.query():
                    self._free.append(slot)
                else:
                    still.append((event, slot))
            self._copies = still
