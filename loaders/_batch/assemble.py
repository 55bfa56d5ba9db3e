"""Batch assembly: a group of batches gathered, once, out of the mapped shards into one staging slot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trainio.storage import IntegrityError

from .gather import copy_ranges, gather_rows, pack_ranges
from .list_layout import Lists
from .row_hash import RowMismatch, check_rows
from .row_numbers import Book
from .row_tables import FieldRows
from .staging import Staging


@dataclass(frozen=True, slots=True)
class Group:
    """Consecutive batches of one consumer: each sample's row in ``book``, and the batch sizes."""

    ids: np.ndarray
    sizes: tuple[int, ...]
    book: Book

    def spans(self) -> list[tuple[int, int]]:
        """Where each batch begins and ends among the group's samples."""
        bounds = np.concatenate(([0], np.cumsum(self.sizes))).tolist()
        return list(zip(bounds[:-1], bounds[1:]))


Columns = dict[str, "np.ndarray | list[Any]"]


def assemble_group(group: Group, slot: Staging, *, lists: Lists, pad_to: int | None,
                   pad_value: int) -> tuple[Columns, list[int]]:
    """Copy the group's samples into ``slot``: its batches by field, and the bytes of each batch's arrays.

    A field's column is an array holding the field for every sample of the
    group (row ``i``, sample ``i``), to be cut into batches along its first
    axis, or a list with one item per batch. Fixed-width fields become
    arrays of ``(samples, ...)``. Lists of numbers (and binary, as lists of
    uint8) are padded (``"pad"``: ``(batch, width)``, width ``pad_to`` or
    the batch's longest row, longer rows cut, plus ``<name>_lengths``) or
    packed (``"pack"``: the values end to end plus ``<name>_offsets``,
    batch + 1 of them); ``lists="auto"`` packs binary fields and pads lists
    of numbers. Other fields (strings, nested types, fields with nulls)
    come as Python lists.

    Where the book's rows carry digests, every row is checked against its
    digest as it is copied.

    Raises:
        IntegrityError: a row does not match its digest (naming its shard,
            field and row); nothing of the group is handed out.
    """
    slot.reset()
    book, ids = group.book, group.ids
    n = int(ids.size)
    spans = group.spans()
    counts = np.asarray(group.sizes, dtype=np.int64)
    nbytes = np.zeros(counts.size, dtype=np.int64)
    columns: Columns = {}
    for name, field in book.fields.items():
        addresses = field.addresses[ids]
        digests = field.digests[ids] if field.digests is not None else None
        try:
            if field.lengths is None:
                out = slot.array((n, *field.shape), field.dtype)
                gather_rows(out.view(np.uint8).reshape(n, field.row_bytes), addresses, field.low, field.high, digests)
                columns[name] = out
                nbytes += counts * field.row_bytes
            elif lists == "pack" or (lists == "auto" and field.binary):
                _pack(name, field, addresses, field.lengths[ids], digests, slot, spans, columns, nbytes)
            else:
                _pad(name, field, ids, addresses, digests, slot, spans, columns, nbytes, pad_to, pad_value)
        except RowMismatch as mismatch:
            raise _damaged(book, ids[mismatch.index:mismatch.index + 1], name, mismatch) from None
    for name in book.names:
        if name not in book.fields:
            values = book.values(name, ids)
            columns[name] = [values[begin:end] for begin, end in spans]
    return columns, nbytes.tolist()


def _damaged(book: Book, one: np.ndarray, name: str, mismatch: RowMismatch) -> IntegrityError:
    """The error for a row that does not match its digest: its shard, field and row."""
    ((shard, row),) = book.locate(one)
    return mismatch.error(*book.tables[shard].source, name, row)


def shards_in(shards: np.ndarray) -> list[int]:
    """The distinct shard numbers in ``shards``, ascending."""
    if shards.size == 0:
        return []
    low = int(shards.min())
    return (np.flatnonzero(np.bincount(shards - low)) + low).tolist()


def _uniform(lengths: np.ndarray) -> int | None:
    """The length every row has, or None."""
    if lengths.size and int(lengths.min()) == int(lengths.max()):
        return int(lengths[0])
    return None


def _pack(name: str, field: FieldRows, addresses: np.ndarray, lengths: np.ndarray, digests: np.ndarray | None,
          slot: Staging, spans: list[tuple[int, int]], columns: Columns, nbytes: np.ndarray) -> None:
    """The group's values end to end in one array, copied by one call; each batch gets its part and its offsets."""
    size = field.dtype.itemsize
    n = lengths.size
    ends = np.cumsum(lengths)
    values = slot.array((int(ends[-1]) if n else 0,), field.dtype)
    raw = values.view(np.uint8)
    width = _uniform(lengths)
    if width is not None and width > 0:
        gather_rows(raw.reshape(n, width * size), addresses, field.low, field.high, digests)
    else:
        pack_ranges(raw, addresses, lengths * size, field.low, field.high, digests)
    values_of, offsets_of = [], []
    for batch, (begin, end) in enumerate(spans):
        first = int(ends[begin - 1]) if begin else 0
        offsets = slot.array((end - begin + 1,), np.dtype(np.int64))
        offsets[0] = 0
        np.subtract(ends[begin:end], first, out=offsets[1:])
        part = values[first:int(ends[end - 1])]
        values_of.append(part)
        offsets_of.append(offsets)
        nbytes[batch] += part.nbytes + offsets.nbytes
    columns[name], columns[f"{name}_offsets"] = values_of, offsets_of


def _pad(name: str, field: FieldRows, ids: np.ndarray, addresses: np.ndarray, digests: np.ndarray | None,
         slot: Staging, spans: list[tuple[int, int]], columns: Columns, nbytes: np.ndarray, pad_to: int | None,
         pad_value: int) -> None:
    assert field.lengths is not None and field.ends is not None
    lengths = field.lengths[ids]
    size = field.dtype.itemsize
    uniform = _uniform(lengths)
    n = lengths.size
    if uniform is not None and pad_to in (None, uniform):
        padded = slot.array((n, uniform), field.dtype)
        gather_rows(padded.view(np.uint8).reshape(n, uniform * size), addresses, field.low, field.high, digests)
        kept = slot.array((n,), np.dtype(np.int64))
        kept.fill(uniform)
        columns[name], columns[f"{name}_lengths"] = padded, kept
        nbytes += np.asarray([end - begin for begin, end in spans]) * (uniform * size + kept.itemsize)
        return
    if digests is not None:  # rows of several lengths are copied past their ends, then cut: checked first, apart
        check_rows(addresses, lengths * size, digests)
    ends = field.ends[ids]
    rows, kept_of = [], []
    for batch, (begin, end) in enumerate(spans):
        count = end - begin
        mine = lengths[begin:end]
        width = pad_to if pad_to is not None else int(mine.max(initial=0))
        padded = slot.array((count, width), field.dtype)
        kept = slot.array((count,), np.dtype(np.int64))
        np.minimum(mine, width, out=kept)
        _copy_padded(padded, addresses[begin:end], ends[begin:end], kept, pad_value, field)
        rows.append(padded)
        kept_of.append(kept)
        nbytes[batch] += padded.nbytes + kept.nbytes
    columns[name], columns[f"{name}_lengths"] = rows, kept_of


def _copy_padded(padded: np.ndarray, addresses: np.ndarray, ends: np.ndarray, kept: np.ndarray, pad_value: int,
                 field: FieldRows) -> None:
    """Row ``i`` of ``padded``: ``kept[i]`` elements from ``addresses[i]``, then ``pad_value`` to the end.

    The rows are gathered whole-width in one call, reading past a row's end
    into the rest of its buffer, and the tails are then overwritten with
    ``pad_value``. A row that ends too near its buffer's end for that is
    first gathered from another row's place, then copied exactly. The tails
    and those rows go in one list of ranges (one system call, not a call
    per row).
    """
    count, width = padded.shape
    size = padded.itemsize
    row_bytes = width * size
    raw = padded.view(np.uint8).reshape(-1)
    exact = addresses + row_bytes > ends
    starts = np.arange(count, dtype=np.int64) * row_bytes
    if not exact.all():
        gather_rows(raw.reshape(count, row_bytes), np.where(exact, addresses[~exact][0], addresses), field.low,
                    field.high)
    tails = kept < width
    pad = np.full(width, pad_value, dtype=padded.dtype)
    copy_ranges(raw,
                np.concatenate((starts[exact], starts[tails] + kept[tails] * size)),
                np.concatenate((addresses[exact], np.full(int(tails.sum()), pad.ctypes.data, dtype=np.int64))),
                np.concatenate((kept[exact] * size, (width - kept[tails]) * size)))
