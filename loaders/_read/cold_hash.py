"""Hashing a memory-mapped shard at the disk's pace when its pages are not in memory.

A page fault reads a mapped file a little at a time; ``read()`` calls on
the same file let the kernel read ahead at the device's full speed. So a
range of a mapping that is not resident is hashed through ``pread`` of the
same file (which also leaves its pages in the page cache for the mapping's
readers), and a resident one straight from the mapping, with no copy.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from trainio.storage import Hasher, libc_function

_READ_PIECE = 8 << 20  # bytes per pread: several of the kernel's read-ahead windows
_FETCH_READ = 1 << 20  # bytes per pread of a range only read into the page cache (into a buffer the CPU's cache holds)
_MADV_HUGEPAGE = 14
_WINDOW = 256 << 10  # bytes of one window of a sampled residency estimate

# Each called holding the GIL: they return in microseconds (see libc_function).
_mincore = libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p], hold_gil=True)
"""Where there is none, every range counts as resident."""
_madvise = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], hold_gil=True)


class _CacheRange(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cached", "dirty", "writeback", "evicted", "recently_evicted")]


_CACHESTAT = 451  # the system call's number on every Linux architecture (6.5 on)
_syscall = libc_function("syscall", [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long],
                         restype=ctypes.c_long, hold_gil=True)


def cached_share(fd: int, size: int, *, windows: int | None = None) -> float | None:
    """The share of the pages of the open file ``fd`` (``size`` bytes) in the page cache now, from the page cache's
    own count (``cachestat``, Linux 6.5 on); None where the system has no such call.

    With ``windows``, an estimate from that many 256 KiB windows spread evenly over a larger file: the call walks
    every page-cache entry of its range, 9 us for a 256 MB file held in 2 MiB folios but 2 ms held in 4 KiB pages
    (with the GIL held, as it must be: see ``libc_function``).
    """
    global _syscall
    stat, cached, pages = _CacheStat(), 0, 0
    for start, end in _spans(size, windows):
        if _syscall is None or _syscall(_CACHESTAT, fd, ctypes.byref(_CacheRange(start, end - start)),
                                        ctypes.byref(stat), 0):
            if _syscall is not None and ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # older kernel, sandbox
                _syscall = None
            return None
        cached, pages = cached + stat.cached, pages + -(-(end - start) // mmap.PAGESIZE)
    return 1.0 if not pages else min(1.0, cached / pages)


def _spans(size: int, windows: int | None) -> list[tuple[int, int]]:
    """The byte ranges a residency estimate of ``size`` bytes looks at: all of them, or ``windows`` 256 KiB windows
    spread evenly over a larger size."""
    if windows is None or size <= windows * _WINDOW:
        return [(0, size)] if size else []
    step = (size - _WINDOW) // max(1, windows - 1)
    return [(k * step, k * step + _WINDOW) for k in range(windows)]


def resident(buffer: pa.Buffer, start: int, end: int) -> bool:
    """Whether every page of ``buffer[start:end]`` (a whole memory-mapped file) is in memory now.

    True where the system cannot tell (no ``mincore``, or it fails).
    """
    pages = _pages_in_memory(buffer, start, end)
    return pages is None or bool(pages.all())


def resident_share(buffer: pa.Buffer, windows: int | None = None) -> float:
    """The share of the pages of ``buffer`` (a whole memory-mapped file) in memory now; 1.0 where it cannot tell.

    With ``windows``, an estimate from that many 256 KiB windows spread evenly over a larger buffer: asking the
    kernel about every page of a 250 MB shard takes 1.2 ms.
    """
    spans = _spans(buffer.size, windows)
    found = [pages for start, end in spans if (pages := _pages_in_memory(buffer, start, end)) is not None]
    if len(found) < len(spans):
        return 1.0
    total = sum(pages.size for pages in found)
    return 1.0 if not total else sum(int(pages.sum()) for pages in found) / total


def _pages_in_memory(buffer: pa.Buffer, start: int, end: int) -> np.ndarray | None:
    """One bool per page of ``buffer[start:end]``: whether it is in memory; None where the system cannot tell."""
    if _mincore is None or end <= start:
        return None
    page = mmap.PAGESIZE
    low = (buffer.address + start) // page * page
    length = buffer.address + end - low
    vector = (ctypes.c_ubyte * (-(-length // page)))()
    if _mincore(low, length, vector) != 0:
        return None
    return (np.frombuffer(vector, dtype=np.uint8) & 1).astype(bool)


def fetch_by_reads(fd: int, start: int, end: int) -> None:
    """Have bytes ``[start, end)`` of the open file ``fd`` read into the page cache, by reading them (the copy is
    dropped): the kernel's read-ahead then fills the cache with large folios, which a mapping maps (and a later
    mapping maps again) many pages at a time. ``posix_fadvise(WILLNEED)`` fills it page by page. A fresh Loader's
    cold first epoch of 1.5 GB here, with :func:`prefer_huge_pages`: 0.74-0.87 s where WILLNEED took 1.1-1.16
    (shuffled: 0.85 against 1.23-1.29), and each warm epoch after it 0.21-0.25 s against 0.32-0.40. Like the
    advice, it never fails: a read that fails, or a file shorter than ``end``, ends it (the readers meet the error).
    """
    view = memoryview(bytearray(min(_FETCH_READ, max(0, end - start))))
    position = start
    try:
        while position < end:
            got = os.preadv(fd, [view[:min(len(view), end - position)]], position)
            if got <= 0:
                return
            position += got
    except OSError:
        return


def prefer_huge_pages(buffer: pa.Buffer) -> None:
    """Ask that the pages of ``buffer`` (a whole memory-mapped file) not in memory yet be read in huge folios when
    it faults on them (``MADV_HUGEPAGE``), then mapped a huge page at a time; nothing where the system cannot. For a
    mapping whose file is read ahead of its faults (:func:`fetch_by_reads`): a worker's mapping, faulted on with no
    read-ahead, took 7% longer in a cold epoch in order."""
    if _madvise is not None and buffer.size:
        low = buffer.address // mmap.PAGESIZE * mmap.PAGESIZE
        _madvise(low, buffer.address + buffer.size - low, _MADV_HUGEPAGE)


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
