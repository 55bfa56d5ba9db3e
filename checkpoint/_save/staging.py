"""Host memory for snapshots: a bounded pool of buffers reused from save to save.

Each slot is one allocation, pre-faulted when made (pinned when the state lives
on a GPU), so taking a snapshot is a copy into memory that is already mapped.
A slot grows only when a state no longer fits; a steady training job
allocates once.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ALIGN = 64
"""Every array starts at a multiple of this many bytes in its slot."""


def aligned(offset: int) -> int:
    """``offset`` rounded up to :data:`ALIGN`."""
    return -(-offset // ALIGN) * ALIGN


class Slot:
    """One staging buffer; the holder owns it until :meth:`release`."""

    def __init__(self, pool: StagingPool) -> None:
        self._pool = pool
        self.buffer: Any = None  # a torch uint8 tensor, or a numpy uint8 array without torch
        self.array: np.ndarray[Any, np.dtype[np.uint8]] = np.empty(0, np.uint8)
        self.pinned = False

    @property
    def capacity(self) -> int:
        """Bytes the slot holds."""
        return int(self.array.nbytes)

    def reserve(self, nbytes: int, *, pinned: bool) -> None:
        """Make the slot hold at least ``nbytes`` (pinned if asked), reallocating only when it must."""
        if nbytes <= self.capacity and (self.pinned or not pinned):
            return
        self.buffer, self.array = None, np.empty(0, np.uint8)
        size = max(nbytes, self.capacity)
        self.buffer, self.array = _allocate(size, pinned=pinned)
        self.pinned = pinned
        log.info("checkpoint staging: allocated a %.1f MiB %sslot", size / 2**20, "pinned " if pinned else "")

    def release(self) -> None:
        """Give the slot back to its pool."""
        self._pool._give_back(self)


def _allocate(size: int, *, pinned: bool) -> tuple[Any, np.ndarray[Any, np.dtype[np.uint8]]]:
    torch = sys.modules.get("torch")  # a state of numpy arrays never pays for importing torch
    if torch is None:
        array = np.zeros(size, np.uint8)
        array.fill(0)  # np.zeros maps lazily: touch every page now, not during a snapshot
        return array, array
    tensor = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
    tensor.zero_()
    return tensor, tensor.numpy()


class StagingPool:
    """At most ``slots`` staging buffers; :meth:`acquire` waits while all are in use."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a staging pool needs at least one slot, not {slots}")
        self._all = [Slot(self) for _ in range(slots)]
        self._free = list(self._all)
        self._cond = threading.Condition()

    def acquire(self) -> Slot:
        """A free slot, waiting for one to be released if none is."""
        with self._cond:
            while not self._free:
                self._cond.wait()
            # The biggest free slot: states keep their size, so it fits without growing.
            slot = max(self._free, key=lambda s: s.capacity)
            self._free.remove(slot)
            return slot

    def prepare(self, nbytes: int, *, pinned: bool) -> None:
        """Make every slot hold at least ``nbytes`` now (pinned if asked), waiting for slots in use to come back."""
        slots = [self.acquire() for _ in range(len(self._all))]
        try:
            for slot in slots:
                slot.reserve(max(nbytes, 1), pinned=pinned)
        finally:
            for slot in slots:
                slot.release()

    def _give_back(self, slot: Slot) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    @property
    def nbytes(self) -> int:
        """Bytes held by the free slots (all slots when nothing is in flight)."""
        with self._cond:
            return sum(s.capacity for s in self._free)
