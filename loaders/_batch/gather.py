"""Row gathers: many rows, anywhere in live memory, copied into one contiguous array in one call.

The rows of a batch come from several memory-mapped shards. Copying them
one Python call per row costs more than the copy itself (an 8 KB row copies
in under a microsecond), so every gather is one call that runs without the
GIL. Adjacent rows are merged into one range first.

The copy is trainio's own small C routine (``_copy``, built at install when
a C compiler is there), which writes long ranges with streaming stores: the
staging buffer is read next by the device copy, not by this thread, and
ordinary stores would first pull every destination line into the cache.
Without it: fixed-width rows are picked by ``torch.index_select`` out of a
"sliding window" view of the memory between the lowest and the highest row
(row ``i`` starting at byte ``i``; numpy fancy indexing, through a
temporary, without torch); rows of different lengths are cut as views out
of one tensor spanning their memory and concatenated by one ``torch.cat``;
short ranges are copied by one ``process_vm_readv`` system call per 1024.

A gather given the rows' digests (XXH3-64 of each row's bytes, from the
shard's row digests) checks every row against its digest as it copies it:
the C routine hashes a row, then copies it while it is in the CPU's cache,
and stops at the first that does not match (:class:`RowMismatch`). Such
rows are not merged, each being one digest's bytes.

Only the rows named are ever touched. The callers guarantee that every
address is the start of a row inside a buffer they keep alive for the
duration of the call (the addresses come from :class:`~._rows.ShardRows`,
which validated them against the Arrow buffers it holds).
"""

from __future__ import annotations

import ctypes
import errno
import operator
import os
from typing import Any

import numpy as np

from .row_hash import RowMismatch, check_rows, row_digests

torch: Any
try:
    import torch
except ImportError:  # torch is optional: numpy does the gather then
    torch = None

_native: Any
try:
    from . import _copy as _native
except ImportError:  # built without a C compiler
    _native = None


class _Memory:
    """An object exposing ``length`` bytes at ``address`` through the numpy array interface."""

    def __init__(self, address: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
        self.__array_interface__ = {"data": (address, False), "shape": shape, "strides": strides,
                                    "typestr": "|u1", "version": 3}


def _window(low: int, high: int, row_bytes: int) -> np.ndarray:
    """Rows of ``row_bytes`` starting at every byte of ``[low, high)``: row ``i`` is the bytes at ``low + i``."""
    count = max(1, high - low - row_bytes + 1)
    return np.asarray(_Memory(low, (count, row_bytes), (1, 1)))


def _copy_checked(destination: np.ndarray, starts: np.ndarray, sources: np.ndarray, sizes: np.ndarray,
                  digests: np.ndarray) -> None:
    """Check row ``i`` against ``digests[i]`` and copy it to ``starts[i]``, for each in turn (ranges not merged)."""
    if _native is None:
        check_rows(sources, sizes, digests)
        _copy_runs(destination, *_runs(starts, sources, sizes))
        return
    arrays = (np.ascontiguousarray(a, dtype=np.int64) for a in (starts, sources, sizes))
    failed = _native.copy_checked(destination, *arrays, np.ascontiguousarray(digests, dtype=np.uint64))
    if failed >= 0:
        actual = row_digests(sources[failed:failed + 1], sizes[failed:failed + 1])
        raise RowMismatch(failed, int(digests[failed]), int(actual[0]))


def gather_rows(out: np.ndarray, addresses: np.ndarray, low: int, high: int, digests: np.ndarray | None = None) -> None:
    """Copy row ``i`` of ``out`` (a C-contiguous ``(n, row_bytes)`` uint8 array) from ``addresses[i]``.

    Every row ``[addresses[i], addresses[i] + row_bytes)`` must lie inside
    ``[low, high)`` and inside memory that stays mapped during the call.
    With ``digests`` (uint64, one per row), each row is checked against its
    digest before it is copied (:class:`RowMismatch` for the first that
    does not match). The copy runs without the GIL.
    """
    n, row_bytes = out.shape
    if n == 0:
        return
    offsets = addresses - low
    if int(offsets.min()) < 0 or int(offsets.max()) + row_bytes > high - low:
        raise ValueError("gather_rows: a row lies outside the memory it was promised to lie in")
    if digests is not None:
        _copy_checked(out.reshape(-1), np.arange(n, dtype=np.int64) * row_bytes, addresses,
                      np.full(n, row_bytes, dtype=np.int64), digests)
        return
    if row_bytes == 0:
        return
    if _native is not None:
        _copy_runs(out, *_runs(np.arange(n, dtype=np.int64) * row_bytes, addresses,
                               np.full(n, row_bytes, dtype=np.int64)))
        return
    window = _window(low, high, row_bytes)
    if torch is not None:
        torch.index_select(torch.from_numpy(window), 0, torch.from_numpy(offsets), out=torch.from_numpy(out))
    else:
        out[...] = window[offsets]


def stack_rows(out: np.ndarray, rows: list[np.ndarray], digests: np.ndarray | None = None) -> None:
    """Stack ``rows`` (arrays of one shape and dtype) into ``out`` (a C-contiguous array of their stacked shape),
    as ``np.stack`` does; with ``digests`` (uint64, one per row), each row is checked against its digest as it
    is copied, while it is in the CPU's cache.

    Raises:
        RowMismatch: row ``index`` does not match its digest; the rows before it are copied, and ``out`` is not
            to be used.
    """
    try:
        failed = -2 if _native is None else _native.stack(out, rows, digests)
    except ValueError:  # a row that is not contiguous (a transform's view), or of another size
        failed = -2
    if failed == -2:
        np.stack(rows, out=out)
        if digests is not None and rows:
            row_bytes = out.nbytes // len(rows)
            check_rows(out.ctypes.data + np.arange(len(rows), dtype=np.int64) * row_bytes,
                       np.full(len(rows), row_bytes, dtype=np.int64), digests)
    elif failed >= 0:
        row = rows[failed]
        actual = row_digests(np.array([row.ctypes.data], dtype=np.int64), np.array([row.nbytes], dtype=np.int64))
        raise RowMismatch(failed, int(digests[failed]), int(actual[0]))  # type: ignore[index]


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

    Adjacent ranges are merged, then all are copied by one call to the C
    routine. Without it, short ranges are copied up to 1024 at a time by one
    system call (so assembling threads do not hand the GIL back and forth for
    every row); long ones, or any where that call is unavailable, by one
    ``memmove`` each. All without the GIL. Every range must lie inside live
    memory and inside ``destination``.
    """
    if lengths.size == 0:
        return
    if int(starts.min()) < 0 or int((starts + lengths).max()) > destination.nbytes:
        raise ValueError("copy_ranges: a range lies outside the destination")
    _copy_runs(destination, *_runs(starts, addresses, lengths))


def _runs(starts: np.ndarray, addresses: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ranges with each run of adjacent ones (in source and destination alike) merged into one."""
    follows = (addresses[1:] == addresses[:-1] + lengths[:-1]) & (starts[1:] == starts[:-1] + lengths[:-1])
    first = np.concatenate(([0], np.flatnonzero(~follows) + 1))
    return starts[first], addresses[first], np.add.reduceat(lengths, first)


def _copy_runs(destination: np.ndarray, starts: np.ndarray, sources: np.ndarray, sizes: np.ndarray) -> None:
    """Copy merged ranges: all by one call to the C routine; without it, short ones by one system call and long
    ones (or all, without that) one memmove each."""
    if _native is not None:
        _native.copy(destination, *(np.ascontiguousarray(a, dtype=np.int64) for a in (starts, sources, sizes)))
        return
    targets = starts + destination.ctypes.data
    many_small = sizes.size > 1 and int(sizes.sum()) < _VECTOR_BELOW * sizes.size
    if many_small and _vector is not None and _copy_vectors(targets, sources, sizes):
        return
    for target, source, size in zip(targets.tolist(), sources.tolist(), sizes.tolist()):
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


def pack_ranges(out: np.ndarray, addresses: np.ndarray, lengths: np.ndarray, low: int, high: int,
                digests: np.ndarray | None = None) -> None:
    """Copy ``lengths[i]`` bytes from ``addresses[i]``, for each ``i`` in turn, end to end into ``out``.

    ``out`` is a contiguous uint8 array of exactly ``lengths.sum()`` bytes.
    Every range must lie inside ``[low, high)`` and inside memory that stays
    mapped during the call. With ``digests``, each range (empty ones too) is
    checked against its digest before it is copied, as :func:`gather_rows`
    checks. The copy runs without the GIL, in one call (the C routine's, or
    without it ``torch.cat`` when the ranges are long), else as
    :func:`copy_ranges` copies.
    """
    if out.nbytes != int(lengths.sum()):
        raise ValueError(f"pack_ranges: {out.nbytes} bytes of room for {int(lengths.sum())} bytes of ranges")
    if digests is not None:
        if lengths.size == 0:
            return
        if int(addresses.min()) < low or int((addresses + lengths).max()) > high or int(lengths.min()) < 0:
            raise ValueError("pack_ranges: a range lies outside the memory it was promised to lie in")
        _copy_checked(out, np.concatenate(([0], np.cumsum(lengths[:-1]))).astype(np.int64), addresses, lengths,
                      digests)
        return
    kept = lengths > 0
    if not kept.all():
        addresses, lengths = addresses[kept], lengths[kept]
    if lengths.size == 0:
        return
    if int(addresses.min()) < low or int((addresses + lengths).max()) > high:
        raise ValueError("pack_ranges: a range lies outside the memory it was promised to lie in")
    starts, sources, sizes = _runs(np.concatenate(([0], np.cumsum(lengths[:-1]))), addresses, lengths)
    if _native is not None or torch is None or sizes.size == 1 or int(sizes.sum()) < _VECTOR_BELOW * sizes.size \
            or not _concatenate(out, sources, sizes, low, high):
        _copy_runs(out, starts, sources, sizes)


def _concatenate(out: np.ndarray, sources: np.ndarray, sizes: np.ndarray, low: int, high: int) -> bool:
    """One ``torch.cat`` of the ranges ``sizes[i]`` bytes at ``sources[i]`` into ``out``, cut as views out of
    the memory ``[low, high)``; False (nothing copied) when two ranges overlap, which such views cannot give."""
    order = np.argsort(sources, kind="stable")
    starts, lengths = sources[order] - low, sizes[order]
    ends = starts + lengths
    if bool((starts[1:] < ends[:-1]).any()):
        return False
    pieces = np.empty(2 * starts.size + 1, dtype=np.int64)  # gap, range, gap, range, ..., gap
    pieces[0] = starts[0]
    pieces[2:-1:2] = starts[1:] - ends[:-1]
    pieces[1::2] = lengths
    pieces[-1] = high - low - ends[-1]
    memory = torch.from_numpy(np.asarray(_Memory(low, (high - low,), (1,))))
    views = memory.split_with_sizes(pieces.tolist())[1::2]
    place = np.empty_like(order)
    place[order] = np.arange(order.size)
    torch.cat(operator.itemgetter(*place.tolist())(views), out=torch.from_numpy(out))
    return True
