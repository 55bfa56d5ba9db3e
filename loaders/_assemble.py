"""Batch assembly: a group of batches gathered, once, out of the mapped shards into one staging slot."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._gather import copy_ranges, gather_rows
from ._rows import FieldRows, ShardRows

Lists = Literal["pad", "pack"]
_ALIGN = 64


class Lease:
    """A group's claim on a staging buffer: every array carved for the group refers to it, and only to it.

    It dies once the last of those arrays (and every tensor made from them)
    is gone, which is when the buffer may be reused.
    """

    def __init__(self, buffer: np.ndarray) -> None:
        self.buffer = buffer
        self.__array_interface__ = {"data": (buffer.ctypes.data, False), "shape": (buffer.nbytes,),
                                    "typestr": "|u1", "version": 3}


class Staging:
    """One slot of the staging ring: a reusable buffer the arrays of a group of batches are carved from.

    ``allocate(nbytes)`` makes the raw buffer: plain numpy memory, or pinned
    host memory when batches go to a CUDA device. A group that needs more
    than the buffer holds gets a new one, sized for the whole group, so the
    next group fits in one buffer again. :meth:`leases` are the group's
    claims on its buffers; the slot is free again when they have all died.
    """

    def __init__(self, allocate: Callable[[int], np.ndarray]) -> None:
        self._allocate = allocate
        self._buffer = np.zeros(0, dtype=np.uint8)
        self._used = 0
        self._requested = 0
        self._carving: np.ndarray = self._buffer
        self._leases: list[Lease] = []

    def reset(self) -> None:
        """Start a new group: every array carved before is the consumer's no longer."""
        if self._requested > self._buffer.nbytes:
            self._buffer = self._allocate(self._requested + self._requested // 4)
        self._used = self._requested = 0
        self._lease(self._buffer)

    def _lease(self, buffer: np.ndarray) -> None:
        lease = Lease(buffer)
        self._leases.append(lease)
        self._carving = np.asarray(lease)

    def leases(self) -> list[Lease]:
        """The current group's leases, handed over once: the slot keeps no reference to them."""
        leases, self._leases = self._leases, []
        self._carving = self._buffer
        return leases

    def array(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype``, 64-byte aligned, from this slot's buffer."""
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._requested += need + _ALIGN
        start = -(-self._used // _ALIGN) * _ALIGN
        if start + need > self._buffer.nbytes:
            self._buffer = self._allocate(max(need, self._requested))
            self._lease(self._buffer)
            start = 0
        self._used = start + need
        return self._carving[start:start + need].view(dtype).reshape(shape)


@dataclass(frozen=True, slots=True)
class Group:
    """Consecutive batches of one consumer: the shard and row of each sample, and the batch sizes."""

    shards: np.ndarray
    rows: np.ndarray
    sizes: tuple[int, ...]
    tables: Mapping[int, ShardRows]


def assemble_group(group: Group, slot: Staging, *, lists: Lists, pad_to: int | None,
                   pad_value: int) -> list[dict[str, Any]]:
    """Copy the group's samples into ``slot``; one dict of arrays per batch.

    Fixed-width fields become arrays of ``(batch, ...)``. Lists of numbers
    (and binary, as lists of uint8) are padded (``lists="pad"``: a ``(batch,
    width)`` array, width ``pad_to`` or the batch's longest row, longer rows
    cut, plus ``<name>_lengths``) or packed (``lists="pack"``: the values end
    to end plus ``<name>_offsets``, batch + 1 of them). Other fields
    (strings, nested types, fields with nulls) come as Python lists.
    """
    slot.reset()
    picks = _Picks(group)
    bounds = np.concatenate(([0], np.cumsum(group.sizes))).tolist()
    spans = list(zip(bounds[:-1], bounds[1:]))
    batches: list[dict[str, Any]] = [{} for _ in spans]
    fields = picks.common_fields()
    for name, field in fields.items():
        if field.lengths is None:
            out = slot.array((picks.n, *field.shape), field.dtype)
            picks.gather(name, out.view(np.uint8).reshape(picks.n, field.row_bytes), field.row_bytes)
            for batch, (begin, end) in zip(batches, spans):
                batch[name] = out[begin:end]
        else:
            lengths = picks.lengths(name)
            if lists == "pack":
                _pack(name, field, picks, lengths, slot, batches, spans)
            else:
                _pad(name, field, picks, lengths, slot, batches, spans, pad_to, pad_value)
    for name in picks.names:
        if name not in fields:
            values = picks.values(name)
            for batch, (begin, end) in zip(batches, spans):
                batch[name] = values[begin:end]
    return batches


def shards_in(shards: np.ndarray) -> list[int]:
    """The distinct shard numbers in ``shards``, ascending."""
    if shards.size == 0:
        return []
    low = int(shards.min())
    return (np.flatnonzero(np.bincount(shards - low)) + low).tolist()


class _Picks:
    """The samples of a group, split by shard, with the per-field address lookups batch assembly needs."""

    def __init__(self, group: Group) -> None:
        self.n = int(group.rows.size)
        self._parts: list[tuple[ShardRows, np.ndarray, np.ndarray]] = []
        unique = shards_in(group.shards)
        for shard in unique:
            where = np.arange(self.n) if len(unique) == 1 else np.flatnonzero(group.shards == shard)
            self._parts.append((group.tables[shard], where, group.rows[where]))
        first = self._parts[0][0]
        self.names: list[str] = [*first.fields, *first.other]

    def common_fields(self) -> dict[str, FieldRows]:
        """The numeric fields laid out alike (kind, dtype, row shape) in every shard of the group."""
        first = self._parts[0][0].fields
        common = {}
        for name, field in first.items():
            others = [table.fields.get(name) for table, _, _ in self._parts]
            if all(o is not None and o.dtype == field.dtype and o.shape == field.shape
                   and (o.lengths is None) == (field.lengths is None) for o in others):
                common[name] = field
        return common

    def _collect(self, pick: Callable[[ShardRows], np.ndarray]) -> np.ndarray:
        if len(self._parts) == 1:
            table, _, rows = self._parts[0]
            picked: np.ndarray = pick(table)[rows]
            return picked
        out = np.empty(self.n, dtype=np.int64)
        for table, where, rows in self._parts:
            out[where] = pick(table)[rows]
        return out

    def addresses(self, name: str) -> np.ndarray:
        """Where each sample's ``name`` starts in memory."""
        return self._collect(lambda table: table.fields[name].addresses)

    def lengths(self, name: str) -> np.ndarray:
        """Elements of each sample's list field ``name``."""
        return self._collect(lambda table: _lengths(table.fields[name]))

    def bounds(self, name: str) -> tuple[int, int]:
        """The memory every sample's ``name`` lies in."""
        fields = [table.fields[name] for table, _, _ in self._parts]
        return min(f.low for f in fields), max(f.high for f in fields)

    def gather(self, name: str, out: np.ndarray, row_bytes: int, rows: slice = slice(None)) -> None:
        """Copy the first ``row_bytes`` of each sample's ``name`` (samples ``rows`` of the group) into ``out``."""
        low, high = self.bounds(name)
        gather_rows(out, self.addresses(name)[rows], low, high)

    def values(self, name: str) -> list[Any]:
        """Each sample's ``name`` as a Python value, in group order."""
        out: list[Any] = [None] * self.n
        for table, where, rows in self._parts:
            for i, row in zip(where.tolist(), rows.tolist()):
                out[i] = table.value(name, row)
        return out

    def samples(self, begin: int, end: int) -> list[dict[str, Any]]:
        """Samples ``begin .. end`` of the group as sample dicts."""
        owner = np.empty(self.n, dtype=np.int64)
        local = np.empty(self.n, dtype=np.int64)
        for part, (_, where, rows) in enumerate(self._parts):
            owner[where], local[where] = part, rows
        return [self._parts[p][0].sample(r) for p, r in zip(owner[begin:end].tolist(), local[begin:end].tolist())]


def _lengths(field: FieldRows) -> np.ndarray:
    assert field.lengths is not None
    return field.lengths


def _uniform(lengths: np.ndarray) -> int | None:
    """The length every row has, or None."""
    if lengths.size and int(lengths.min()) == int(lengths.max()):
        return int(lengths[0])
    return None


def _pack(name: str, field: FieldRows, picks: _Picks, lengths: np.ndarray, slot: Staging,
          batches: list[dict[str, Any]], spans: list[tuple[int, int]]) -> None:
    size = field.dtype.itemsize
    width = _uniform(lengths)
    addresses = picks.addresses(name)
    for batch, (begin, end) in zip(batches, spans):
        offsets = slot.array((end - begin + 1,), np.dtype(np.int64))
        offsets[0] = 0
        np.cumsum(lengths[begin:end], out=offsets[1:])
        flat = slot.array((int(offsets[-1]),), field.dtype)
        raw = flat.view(np.uint8)
        if width is not None and width > 0:
            picks.gather(name, raw.reshape(end - begin, width * size), width * size, slice(begin, end))
        else:
            copy_ranges(raw, offsets[:-1] * size, addresses[begin:end], lengths[begin:end] * size)
        batch[name], batch[f"{name}_offsets"] = flat, offsets


def _pad(name: str, field: FieldRows, picks: _Picks, lengths: np.ndarray, slot: Staging,
         batches: list[dict[str, Any]], spans: list[tuple[int, int]], pad_to: int | None, pad_value: int) -> None:
    size = field.dtype.itemsize
    uniform = _uniform(lengths)
    if uniform is not None and pad_to in (None, uniform):
        padded = slot.array((picks.n, uniform), field.dtype)
        picks.gather(name, padded.view(np.uint8).reshape(picks.n, uniform * size), uniform * size)
        kept = slot.array((picks.n,), np.dtype(np.int64))
        kept.fill(uniform)
        for batch, (begin, end) in zip(batches, spans):
            batch[name], batch[f"{name}_lengths"] = padded[begin:end], kept[begin:end]
        return
    addresses = picks.addresses(name)
    for batch, (begin, end) in zip(batches, spans):
        count = end - begin
        mine = lengths[begin:end]
        width = pad_to if pad_to is not None else int(mine.max(initial=0))
        padded = slot.array((count, width), field.dtype)
        kept = slot.array((count,), np.dtype(np.int64))
        np.minimum(mine, width, out=kept)
        _copy_padded(padded, addresses[begin:end], kept, pad_value)
        batch[name], batch[f"{name}_lengths"] = padded, kept


def _copy_padded(padded: np.ndarray, addresses: np.ndarray, kept: np.ndarray, pad_value: int) -> None:
    """Row ``i`` of ``padded``: ``kept[i]`` elements from ``addresses[i]``, then ``pad_value`` to the end.

    The padding is copied from a row of ``pad_value``, so rows and padding go
    in one list of ranges (one system call, not a call per row).
    """
    count, width = padded.shape
    size = padded.itemsize
    pad = np.full(width, pad_value, dtype=padded.dtype)
    row_starts = np.arange(count, dtype=np.int64) * (width * size)
    starts = np.empty(2 * count, dtype=np.int64)
    sources = np.empty(2 * count, dtype=np.int64)
    lengths = np.empty(2 * count, dtype=np.int64)
    starts[0::2], sources[0::2], lengths[0::2] = row_starts, addresses, kept * size
    starts[1::2], sources[1::2], lengths[1::2] = row_starts + kept * size, pad.ctypes.data, (width - kept) * size
    copy_ranges(padded.view(np.uint8).reshape(-1), starts, sources, lengths)
