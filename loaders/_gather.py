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
_memset: Any = ctypes.memset


def copy_ranges(destination: np.ndarray, starts: np.ndarray, addresses: np.ndarray, lengths: np.ndarray) -> None:
    """Copy ``lengths[i]`` bytes from ``addresses[i]`` to byte ``starts[i]`` of ``destination`` (uint8, contiguous).

    Ranges that are adjacent both in the source and in the destination are
    copied by one call. Every range must lie inside live memory and inside
    ``destination``.
    """
    if lengths.size == 0:
        return
    if int(starts.min()) < 0 or int((starts + lengths).max()) > destination.nbytes:
        raise ValueError("copy_ranges: a range lies outside the destination")
    follows = (addresses[1:] == addresses[:-1] + lengths[:-1]) & (starts[1:] == starts[:-1] + lengths[:-1])
    first = np.concatenate(([0], np.flatnonzero(~follows) + 1))
    totals = np.add.reduceat(lengths, first)
    base = destination.ctypes.data
    for target, source, size in zip((starts[first] + base).tolist(), addresses[first].tolist(), totals.tolist()):
        if size:
            _memmove(target, source, size)


def fill_ranges(destination: np.ndarray, starts: np.ndarray, lengths: np.ndarray, byte: int) -> None:
    """Set ``lengths[i]`` bytes from byte ``starts[i]`` of ``destination`` (uint8, contiguous) to ``byte``."""
    if lengths.size == 0:
        return
    if int(starts.min()) < 0 or int((starts + lengths).max()) > destination.nbytes:
        raise ValueError("fill_ranges: a range lies outside the destination")
    base = destination.ctypes.data
    for target, size in zip((starts + base).tolist(), lengths.tolist()):
        if size:
            _memset(target, byte, size)
