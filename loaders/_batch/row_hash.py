"""Rows checked against their digests: the XXH3-64 of each row's bytes, computed many rows to a call.

The C routine (``_copy``) hashes without the GIL; without it, ``xxhash``
hashes one row per call. Torch is not needed here (the dataset writer
computes its row digests with this module).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import xxhash

from trainio.storage import IntegrityError

_native: Any
try:
    from . import _copy as _native
except ImportError:  # built without a C compiler
    _native = None


class RowMismatch(Exception):
    """Row ``index`` of a checked gather (of field ``field``, where the gather knows it) does not match its digest;
    it and the rows after it were not copied."""

    def __init__(self, index: int, expected: int, actual: int, field: str = "") -> None:
        super().__init__(f"row {index}: xxh3-64 is {actual:016x}, expected {expected:016x}")
        self.index = index
        self.expected = expected
        self.actual = actual
        self.field = field

    def error(self, url: str, key: str, field: str, row: int) -> IntegrityError:
        """The error to raise: row ``row`` (of its shard ``key`` in dataset ``url``) of ``field`` is damaged."""
        return IntegrityError(url, key, f"{self.expected:016x}", f"{self.actual:016x}",
                              "the shard is damaged; no sample holding this row was delivered: run trainio verify, "
                              "then restore or re-shard it", what=f"row {row} of field {field!r}: xxh3-64")


def row_digests(addresses: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The XXH3-64 digest (seed 0) of the ``sizes[i]`` bytes at ``addresses[i]``, for every ``i`` (live memory)."""
    out = np.empty(addresses.size, dtype=np.uint64)
    if _native is not None:
        _native.digests(out, np.ascontiguousarray(addresses, dtype=np.int64),
                        np.ascontiguousarray(sizes, dtype=np.int64))
        return out
    for i, (address, size) in enumerate(zip(addresses.tolist(), sizes.tolist())):
        out[i] = xxhash.xxh3_64_intdigest(ctypes.string_at(address, size))
    return out


def check_rows(addresses: np.ndarray, sizes: np.ndarray, digests: np.ndarray) -> None:
    """Raise :class:`RowMismatch` for the first row whose bytes do not match its digest.

    ``sizes[i]`` bytes at ``addresses[i]`` (live memory) against
    ``digests[i]`` (uint64), for every ``i``.
    """
    found = row_digests(addresses, sizes)
    wrong = np.flatnonzero(found != digests)
    if wrong.size:
        first = int(wrong[0])
        raise RowMismatch(first, int(digests[first]), int(found[first]))
