"""Row gathers: many equal-sized rows, anywhere in live memory, copied into one contiguous array in one call.

The rows of a batch come from several memory-mapped shards. Copying them
one Python call per row costs more than the copy itself (an 8 KB row copies
in under a microsecond), so the rows are gathered by one C-level call: the
memory between the lowest and the highest row is viewed as a "sliding
window" array whose row ``i`` starts at byte ``i``, and the rows are picked
out of it by index (``torch.index_select`` straight into the destination
when torch is present; numpy fancy indexing, through a temporary, when not).

Only the rows named are ever touched. The callers guarantee that every
address is the start of a row inside a buffer they keep alive for the
duration of the call (the addresses come from :class:`~._rows.ShardRows`,
which validated them against the Arrow buffers it holds).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

import numpy as np

torch: Any
try:
    import torch
except ImportError:  # torch is optional: numpy does the gather then
    torch = None


class _Memory:
    """An object exposing ``length`` bytes at ``address`` through the numpy array interface."""

    def __init__(self, address: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
        self.__array_interface__ = {"data": (address, False), "shape": shape, "strides": strides,
                                    "typestr": "|u1", "version": 3}


def _window(low: int, high: int, row_bytes: int) -> np.ndarray:
    """Rows of ``row_bytes`` starting at every byte of ``[low, high)``: row ``i`` is the bytes at ``low + i``."""
    count = max(1, high - low - row_bytes + 1)
    return np.asarray(_Memory(low, (count, row_bytes), (1, 1)))


def gather_rows(out: np.ndarray, addresses: np.ndarray, low: int, high: int) -> None:
    """Copy row ``i`` of ``out`` (a C-contiguous ``(n, row_bytes)`` uint8 array) from ``addresses[i]``.

    Every row ``[addresses[i], addresses[i] + row_bytes)`` must lie inside
    ``[low, high)`` and inside memory that stays mapped during the call.
    The copy runs without the GIL.
    """
    n, row_bytes = out.shape
    if n == 0 or row_bytes == 0:
        return
    offsets = addresses - low
    if int(offsets.min()) < 0 or int(offsets.max()) + row_bytes > high - low:
        raise ValueError("gather_rows: a row lies outside the memory it was promised to lie in")
    window = _window(low, high, row_bytes)
    if torch is not None:
        torch.index_select(torch.from_numpy(window), 0, torch.from_numpy(offsets), out=torch.from_numpy(out))
    else:
        out[...] = window[offsets]


_memmove: Any = ctypes.memmove
_IOV_MAX = 1024
# Ranges longer than this on average are copied one memmove each: process_vm_readv
# pins every page it copies, which costs more than a Python call per range once
# ranges pass a couple of pages (measured on one thread: even at 4 KB, 8.3 against
# 4.4-5.4 GB/s for 100 KB ranges).
_VECTOR_BELOW = 8192


def _vector_copy() -> Any:
    """Linux's process_vm_readv, which copies a list of ranges into another list in one system call, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.process_vm_readv
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                         ctypes.c_ulong]
    function.restype = ctypes.c_ssize_t
    return function


_vector: Any = _vector_copy()


def copy_ranges(destination: np.ndarray, starts: np.ndarray, addresses: np.ndarray, lengths: np.ndarray) -> None:
    """Copy ``lengths[i]`` bytes from ``addresses[i]`` to byte ``starts[i]`` of ``destination`` (uint8, contiguous).

    Adjacent ranges are merged. Short ranges are then copied up to 1024 at a
    time by one system call without the GIL (so assembling threads do not
    hand the GIL back and forth for every row); long ones, or any where that
    call is unavailable, by one ``memmove`` each, also without the GIL.
    Every range must lie inside live memory and inside ``destination``.
    """
    if lengths.size == 0:
        return
    if int(starts.min()) < 0 or int((starts + lengths).max()) > destination.nbytes:
        raise ValueError("copy_ranges: a range lies outside the destination")
    follows = (addresses[1:] == addresses[:-1] + lengths[:-1]) & (starts[1:] == starts[:-1] + lengths[:-1])
    first = np.concatenate(([0], np.flatnonzero(~follows) + 1))
    totals = np.add.reduceat(lengths, first)
    targets = starts[first] + destination.ctypes.data
    sources = addresses[first]
    many_small = first.size > 1 and int(totals.sum()) < _VECTOR_BELOW * first.size
    if many_small and _vector is not None and _copy_vectors(targets, sources, totals):
        return
    for target, source, size in zip(targets.tolist(), sources.tolist(), totals.tolist()):
        if size:
            _memmove(target, source, size)


def _copy_vectors(targets: np.ndarray, sources: np.ndarray, sizes: np.ndarray) -> bool:
    """Copy with process_vm_readv on this process; False (nothing copied) when the kernel refuses it."""
    global _vector
    pid = os.getpid()
    for begin in range(0, sizes.size, _IOV_MAX):
        end = begin + _IOV_MAX
        local = np.stack((targets[begin:end], sizes[begin:end]), axis=1).astype(np.uint64)
        remote = np.stack((sources[begin:end], sizes[begin:end]), axis=1).astype(np.uint64)
        want = int(sizes[begin:end].sum())
        done = _vector(pid, local.ctypes.data, len(local), remote.ctypes.data, len(remote), 0)
        if done == want:
            continue
        if begin == 0 and done < 0 and ctypes.get_errno() in (errno.EPERM, errno.ENOSYS, errno.EACCES):
            _vector = None  # forbidden here (a seccomp profile, say): memmove from now on
            return False
        raise OSError(ctypes.get_errno(), f"copying rows: process_vm_readv copied {done} of {want} bytes")
    return True

