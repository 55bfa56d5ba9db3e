"""The rows of several shards numbered as one, so a group of samples is looked up with one index per field."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .row_tables import FieldRows, ShardRows


class Book:
    """Every row of a set of shards, numbered end to end in shard-number order.

    :meth:`ids` gives each (shard, row) its number here. ``fields`` has the
    numeric fields laid out alike (dtype, row shape, fixed or list) in every
    shard, with the address (and list length) of every row of every shard,
    so the rows of any group of samples are found with one index operation
    per field whichever shards they come from. Every other field (strings,
    nested types, columns with nulls, fields laid out differently in some
    shard) is read a row at a time with :meth:`values`. A book holds its
    shards' tables, and so their memory, alive.
    """

    def __init__(self, tables: Mapping[int, ShardRows]) -> None:
        if not tables:
            raise ValueError("a Book needs at least one shard")
        self.tables = dict(sorted(tables.items()))
        numbers = np.fromiter(self.tables, dtype=np.int64, count=len(self.tables))
        sizes = np.fromiter((t.rows for t in self.tables.values()), dtype=np.int64, count=len(self.tables))
        self._numbers = numbers
        self._firsts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        self._base = np.zeros(int(numbers[-1]) + 1, dtype=np.int64)
        self._base[numbers] = self._firsts
        shards = list(self.tables.values())
        first = shards[0]
        self.names: list[str] = [*first.fields, *first.other]
        self.fields: dict[str, FieldRows] = {}
        for name in first.fields:
            merged = _merge([shard.fields.get(name) for shard in shards])
            if merged is not None:
                self.fields[name] = merged
        self.row_checked = all(shard.row_checked for shard in shards) and len(self.fields) == len(self.names)
        """Whether every row of every field is checked against its digest as it is gathered."""

    def covers(self, shards: Iterable[int]) -> bool:
        """Whether every one of ``shards`` is in this book."""
        return all(shard in self.tables for shard in shards)

    def ids(self, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The number here of row ``rows[i]`` of shard ``shards[i]``, for every ``i``."""
        numbered: np.ndarray = self._base[shards] + rows
        return numbered

    def values(self, name: str, ids: np.ndarray) -> list[Any]:
        """Field ``name`` of each row ``ids``, as a Python value (see :meth:`ShardRows.value`)."""
        return [self.tables[shard].value(name, row) for shard, row in self.locate(ids)]

    def samples(self, ids: np.ndarray) -> list[dict[str, Any]]:
        """Rows ``ids`` as sample dicts (see :meth:`ShardRows.sample`)."""
        return [self.tables[shard].sample(row) for shard, row in self.locate(ids)]

    def locate(self, ids: np.ndarray) -> zip[tuple[int, int]]:
        """The (shard, row within it) of each of ``ids``."""
        place = np.searchsorted(self._firsts, ids, side="right") - 1
        return zip(self._numbers[place].tolist(), (ids - self._firsts[place]).tolist())


def _merge(fields: Sequence[FieldRows | None]) -> FieldRows | None:
    """One field's rows across shards, end to end; None unless it is laid out alike in all of them."""
    first = fields[0]
    if first is None:
        return None
    for other in fields[1:]:
        if other is None or other.dtype != first.dtype or other.shape != first.shape \
                or (other.lengths is None) != (first.lengths is None) or other.binary != first.binary:
            return None
    if len(fields) == 1:
        return first
    present = [f for f in fields if f is not None]
    lengths = ends = digests = None
    if all(f.digests is not None for f in present):
        digests = np.concatenate([f.digests for f in present if f.digests is not None])
    if first.lengths is not None:
        lengths = np.concatenate([f.lengths for f in present if f.lengths is not None])
        ends = np.concatenate([f.ends for f in present if f.ends is not None])
    return FieldRows(first.dtype, first.shape, np.concatenate([f.addresses for f in present]), lengths,
                     min(f.low for f in present), max(f.high for f in present), ends, first.binary, digests)
