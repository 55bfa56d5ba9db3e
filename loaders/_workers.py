"""Where this process runs in a job: its rank and world size, its DataLoader worker, and memory its workers share."""

from __future__ import annotations

import mmap
import os


def rank_and_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """``(rank, world)`` as given, else from torch.distributed when it is initialized, else RANK/WORLD_SIZE or (0, 1)."""
    if rank is not None and world is not None:
        return rank, world
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_info() -> tuple[int, int]:
    """(number of DataLoader workers, this worker's id); (1, 0) outside a worker."""
    try:
        from torch.utils.data import get_worker_info
    except ImportError:
        return 1, 0
    info = get_worker_info()
    return (1, 0) if info is None else (info.num_workers, info.id)


def in_worker() -> bool:
    """Whether this runs inside a DataLoader worker."""
    try:
        from torch.utils.data import get_worker_info
    except ImportError:
        return False
    return get_worker_info() is not None


def shared_flag() -> mmap.mmap | None:
    """One byte of memory shared with the processes forked from this one (None where there is no such memory)."""
    try:
        return mmap.mmap(-1, 1)  # anonymous and MAP_SHARED: a forked DataLoader worker writes what the parent reads
    except OSError:
        return None


def worker_count() -> int:
    """The number of DataLoader workers this runs among (1 outside a worker)."""
    return worker_info()[0]


class SharedEpochs:
    """Which epoch a dataset's passes read, shared by its copies in this process and the processes forked from it.

    ``begin()`` at the start of every pass (in whichever copy iterates: this
    process, or a DataLoader worker forked from it) gives the epoch to read:
    the one after the last epoch some copy read to its end, unless
    :meth:`set` named one since. ``done(epoch)`` records a pass read to its
    end. ``current`` is the epoch the latest pass began. A copy made by
    pickling (a worker started by ``spawn``) gets memory of its own, which
    the others never see (``shared`` is False there).
    """

    def __init__(self) -> None:
        try:
            self._memory: mmap.mmap | bytearray = mmap.mmap(-1, 16)  # anonymous, MAP_SHARED: forks see one memory
            self.shared = True
        except OSError:
            self._memory = bytearray(16)
            self.shared = False
        self._cells = memoryview(self._memory).cast("q")  # [next epoch to read, epoch the latest pass began]

    def __getstate__(self) -> dict[str, int]:
        return {"next": self._cells[0], "current": self._cells[1]}

    def __setstate__(self, state: dict[str, int]) -> None:
        self._memory = bytearray(16)
        self._cells = memoryview(self._memory).cast("q")
        self._cells[0], self._cells[1] = state["next"], state["current"]
        self.shared = False

    @property
    def current(self) -> int:
        """The epoch the latest pass began (or the one :meth:`set` named since)."""
        return int(self._cells[1])

    @property
    def upcoming(self) -> int:
        """The epoch the next pass will read."""
        return int(self._cells[0])

    def set(self, epoch: int) -> None:
        """The next pass reads ``epoch`` (an explicit choice: ``set_epoch``, or a resumed state)."""
        self._cells[0] = self._cells[1] = epoch

    def begin(self) -> int:
        """The epoch the pass starting now reads."""
        epoch = int(self._cells[0])
        self._cells[1] = epoch
        return epoch

    def done(self, epoch: int) -> None:
        """A pass read ``epoch`` to its end: the next pass reads the epoch after it."""
        self._cells[0] = max(int(self._cells[0]), epoch + 1)
