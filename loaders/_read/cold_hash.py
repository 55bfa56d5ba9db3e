"""Hashing a memory-mapped shard at the disk's pace when its pages are not in memory.

A page fault reads a mapped file a little at a time; ``read()`` calls on
the same file let the kernel read ahead at the device's full speed. So a
range of a mapping that is not resident is hashed through ``pread`` of the
same file (which also leaves its pages in the page cache for the mapping's
readers), and a resident one straight from the mapping, with no copy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from trainio.storage import Hasher

_READ_PIECE = 8 << 20  # bytes per pread: several of the kernel's read-ahead windows

def _find_mincore() -> Callable[..., int] | None:
    """libc's ``mincore``, or None where there is none (every range then counts as resident)."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    function.restype = ctypes.c_int
    return function


_mincore = _find_mincore()


def resident(buffer: pa.Buffer, start: int, end: int) -> bool:
    """Whether every page of ``buffer[start:end]`` (a whole memory-mapped file) is in memory now.

    True where the system cannot tell (no ``mincore``, or it fails).
    """
    if _mincore is None or end <= start:
        return True
    page = mmap.PAGESIZE
    low = (buffer.address + start) // page * page
    length = buffer.address + end - low
    vector = (ctypes.c_ubyte * (-(-length // page)))()
    if _mincore(low, length, vector) != 0:
        return True
    return bool((np.frombuffer(vector, dtype=np.uint8) & 1).all())


def hash_by_reads(fd: int, hasher: Hasher, start: int, end: int, stopped: Callable[[], bool]) -> bool:
    """Feed bytes ``[start, end)`` of the open file ``fd`` to ``hasher`` through ``pread``; False if ``stopped()``
    turned true between two reads (the hash is then incomplete).

    Raises:
        OSError: a read failed, or the file ended before ``end``.
    """
    buffer = bytearray(min(_READ_PIECE, end - start))
    view = memoryview(buffer)
    position = start
    while position < end:
        if stopped():
            return False
        want = min(len(buffer), end - position)
        got = os.preadv(fd, [view[:want]], position)
        if got <= 0:
            raise OSError(f"the file ended at byte {position}, before {end}")
        hasher.update(view[:got])
        position += got
    return True
