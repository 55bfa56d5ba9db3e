"""Where every row of a shard lives in memory, per field: the tables batch assembly gathers from."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from .._format.columns import Columns, sample_of
from .row_hash import row_digests


@dataclass(frozen=True, slots=True)
class FieldRows:
    """One numeric field of one shard: the address of each row's first byte, and its size.

    Fixed-width fields (scalars, tensors, fixed-size binary) have ``shape``,
    the shape of one row, and ``lengths`` None. Lists (and binary, as lists
    of uint8) have ``lengths``, the elements of each row, and ``ends``,
    where the values buffer each row lies in ends (reading past a row's
    last element up to there is safe). ``low``/``high`` bound the memory
    every row lies in. ``binary`` marks a binary field (variable-length
    bytes) laid out as a list of uint8. ``digests``, where the shard has
    row digests, holds each row's XXH3-64 (uint64), checked as it is copied.
    """

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    addresses: np.ndarray
    lengths: np.ndarray | None
    low: int
    high: int
    ends: np.ndarray | None = None
    binary: bool = False
    digests: np.ndarray | None = None

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of a fixed-width field."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def sizes(self) -> np.ndarray:
        """Bytes of each row."""
        if self.lengths is not None:
            return self.lengths * self.dtype.itemsize
        return np.full(self.addresses.size, self.row_bytes, dtype=np.int64)


class ShardRows:
    """The rows of one shard, laid out for gathering; holds the shard's record batches (and so its memory) alive.

    ``fields`` has the numeric fields (fixed-width and lists, binary as lists
    of uint8) that are laid out the same way in every record batch; every
    other field (strings, nested types, columns with nulls) is read row by
    row with :meth:`value`.

    Given the shard's row digests (field name to one uint64 per row), the
    table is :attr:`row_checked` when every field is gathered by rows and
    has its digests: each field's rows then carry them. Otherwise (a field
    read row by row, or a digest count that is not the row count) it is
    not, and the caller must check the shard whole before using it.
    """

    def __init__(self, batches: Sequence[pa.RecordBatch], source: tuple[str, str] = ("", ""),
                 digests: Mapping[str, np.ndarray] | None = None) -> None:
        self.source = source
        self._columns = [Columns.of(batch, binary_as_lists=True, source=source) for batch in batches]
        self._samplers: list[Callable[[int], dict[str, Any]] | None] = [None] * len(self._columns)  # made when used
        sizes = np.asarray([batch.num_rows for batch in batches], dtype=np.int64)
        self._firsts = np.concatenate(([0], np.cumsum(sizes)[:-1])) if sizes.size else sizes
        self.rows = int(sizes.sum())
        self._binary = [field.name for field in batches[0].schema if _is_binary(field.type)] if batches else []
        self.fields: dict[str, FieldRows] = {}
        names = batches[0].schema.names if batches else []
        for name in names:
            rows = self._fixed_rows(name) or self._list_rows(name)
            if rows is not None:
                self.fields[name] = rows
        self.other = [name for name in names if name not in self.fields]
        self.row_checked = digests is not None and not self.other and set(digests) == set(self.fields) \
            and all(d.shape == (self.rows,) for d in digests.values())
        if self.row_checked:
            assert digests is not None
            self.fields = {name: replace(rows, digests=digests[name]) for name, rows in self.fields.items()}

    def _fixed_rows(self, name: str) -> FieldRows | None:
        arrays = [columns.fixed.get(name) for columns in self._columns]
        if any(a is None for a in arrays):
            return None
        present = [a for a in arrays if a is not None]
        first = present[0]
        row_bytes = first.dtype.itemsize * int(np.prod(first.shape[1:], dtype=np.int64))
        addresses = np.concatenate([a.ctypes.data + np.arange(len(a), dtype=np.int64) * row_bytes for a in present])
        low = min(a.ctypes.data for a in present)
        high = max(a.ctypes.data + a.nbytes for a in present)
        return FieldRows(first.dtype, first.shape[1:], addresses, None, low, high)

    def _list_rows(self, name: str) -> FieldRows | None:
        pairs = [columns.lists.get(name) for columns in self._columns]
        if any(p is None for p in pairs):
            return None
        present = [p for p in pairs if p is not None]
        dtype = present[0][0].dtype
        addresses = np.concatenate([values.ctypes.data + offsets[:-1].astype(np.int64) * dtype.itemsize
                                    for values, offsets in present])
        lengths = np.concatenate([np.diff(offsets).astype(np.int64) for _, offsets in present])
        ends = np.concatenate([np.full(offsets.size - 1, values.ctypes.data + values.nbytes, dtype=np.int64)
                               for values, offsets in present])
        low = min(values.ctypes.data for values, _ in present)
        high = max(values.ctypes.data + values.nbytes for values, _ in present)
        return FieldRows(dtype, (), addresses, lengths, low, high, ends, binary=name in self._binary)

    def digests(self) -> dict[str, np.ndarray] | None:
        """Each field's row digests (XXH3-64 of each row's bytes, as the gathers copy them), in the schema's order;
        None when some field is not gathered by rows (then it has none)."""
        if self.other:
            return None
        return {name: row_digests(rows.addresses, rows.sizes()) for name, rows in self.fields.items()}

    def value(self, name: str, row: int) -> Any:
        """Field ``name`` of row ``row``, as :meth:`sample` gives it."""
        batch, local = self._locate(row)
        column = self._columns[batch].other.get(name)
        if column is not None:
            return column[local].as_py()
        return self.sample(row)[name]

    def sample(self, row: int) -> dict[str, Any]:
        """Row ``row`` as a sample dict: numbers as numpy scalars, lists and tensors as array views, binary as bytes."""
        batch, local = self._locate(row)
        of_batch = self._samplers[batch]
        if of_batch is None:
            of_batch = self._samplers[batch] = sample_of(self._columns[batch])
        sample = of_batch(local)
        for name in self._binary:
            if isinstance(sample[name], np.ndarray):
                sample[name] = sample[name].tobytes()
        return sample

    def _locate(self, row: int) -> tuple[int, int]:
        """The record batch holding shard row ``row``, and the row within it."""
        batch = int(np.searchsorted(self._firsts, row, side="right")) - 1
        return batch, row - int(self._firsts[batch])


def _is_binary(kind: pa.DataType) -> bool:
    return bool(pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind))
