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
