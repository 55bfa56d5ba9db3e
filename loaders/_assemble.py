"""Batch assembly: many rows of many record batches copied, once, into one set of staging arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

Lists = Literal["pad", "pack"]


@dataclass(frozen=True, slots=True)
class Columns:
    """Zero-copy numpy views of one record batch, per field.

    ``fixed[name]`` has rows on its first axis (scalars: 1-D; tensors:
    N-D); ``lists[name]`` is ``(values, offsets)``; ``other[name]`` is the
    Arrow array itself (strings, binary, nested types, columns with nulls).
    """

    fixed: dict[str, np.ndarray]
    lists: dict[str, tuple[np.ndarray, np.ndarray]]
    other: dict[str, pa.Array]

    @classmethod
    def of(cls, batch: pa.RecordBatch) -> Columns:
        """The views of ``batch``."""
        fixed, lists, other = {}, {}, {}
        for name, column in zip(batch.schema.names, batch.columns):
            kind = column.type
            if column.null_count:
                other[name] = column
            elif isinstance(kind, pa.FixedShapeTensorType):
                fixed[name] = column.to_numpy_ndarray()
            elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _is_numeric(kind.value_type):
                lists[name] = (column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy())
            elif _is_numeric(kind):
                fixed[name] = column.to_numpy(zero_copy_only=False)
            else:
                other[name] = column
        return cls(fixed, lists, other)


def _is_numeric(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind))


class Staging:
    """One slot of the staging ring: reusable arrays a batch is assembled into (grown when a batch needs more).

    ``allocate(nbytes)`` makes the raw buffers: plain numpy memory, or pinned
    host memory when batches go to a CUDA device.
    """

    def __init__(self, allocate: Any) -> None:
        self._allocate = allocate
        self._buffers: dict[str, np.ndarray] = {}

    def array(self, key: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype`` over this slot's buffer for ``key``."""
        need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buffer = self._buffers.get(key)
        if buffer is None or buffer.nbytes < need:
            buffer = self._allocate(max(need, 1 if buffer is None else 2 * buffer.nbytes))
            self._buffers[key] = buffer
        return buffer[:need].view(dtype).reshape(shape)


def runs(shards: np.ndarray, batches: np.ndarray, rows: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Maximal runs of consecutive rows of one record batch: (start in the batch being built, end, first row, shard batch index).

    Returned as (begin, end, row, key) where samples ``[begin, end)`` of the
    batch being built are rows ``row .. row + end - begin`` of the record
    batch at position ``key`` of the given arrays (its first sample).
    """
    n = rows.size
    if n == 0:
        return []
    breaks = np.flatnonzero((shards[1:] != shards[:-1]) | (batches[1:] != batches[:-1]) | (rows[1:] != rows[:-1] + 1))
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks + 1, [n]))
    return list(zip(starts.tolist(), ends.tolist(), rows[starts].tolist(), starts.tolist()))


def assemble(parts: list[tuple[Columns, int, int, int]], n: int, slot: Staging, *, lists: Lists,
             pad_to: int | None, pad_value: int) -> dict[str, Any]:
    """Copy ``n`` samples into ``slot``; the batch as a dict of arrays.

    ``parts`` are runs ``(columns, begin, end, row)``: samples ``[begin, end)``
    of the batch are rows ``row .. row + end - begin`` of ``columns``, so a
    run is one copy per field. Fixed-width fields become arrays of
    ``(n, ...)``. Lists of numbers are padded (``lists="pad"``: an
    ``(n, width)`` array, width ``pad_to`` or the longest row, longer rows
    cut, plus ``<name>_lengths``) or packed (``lists="pack"``: the values end
    to end plus ``<name>_offsets``, n + 1 of them). Other fields (strings,
    binary) come as Python lists.
    """
    first = parts[0][0]
    out: dict[str, Any] = {}
    for name, array in first.fixed.items():
        target = slot.array(name, (n, *array.shape[1:]), array.dtype)
        for columns, begin, end, row in parts:
            target[begin:end] = columns.fixed[name][row:row + end - begin]
        out[name] = target
    for name, (values, _) in first.lists.items():
        lengths = slot.array(f"{name}_lengths", (n,), np.dtype(np.int64))
        for columns, begin, end, row in parts:
            offsets = columns.lists[name][1]
            np.subtract(offsets[row + 1:row + 1 + end - begin], offsets[row:row + end - begin], out=lengths[begin:end])
        if lists == "pack":
            out.update(_packed(name, parts, lengths, slot, values.dtype))
        else:
            out.update(_padded(name, parts, lengths, slot, values.dtype, pad_to, pad_value))
    for name in first.other:
        out[name] = [columns.other[name][row + k].as_py() for columns, begin, end, row in parts
                     for k in range(end - begin)]
    return out


def _packed(name: str, parts: list[tuple[Columns, int, int, int]], lengths: np.ndarray, slot: Staging,
            dtype: np.dtype[Any]) -> dict[str, np.ndarray]:
    n = lengths.size
    offsets = slot.array(f"{name}_offsets", (n + 1,), np.dtype(np.int64))
    offsets[0] = 0
    np.cumsum(lengths, out=offsets[1:])
    flat = slot.array(name, (int(offsets[-1]),), dtype)
    for columns, begin, end, row in parts:
        values, source = columns.lists[name]
        flat[offsets[begin]:offsets[end]] = values[source[row]:source[row + end - begin]]
    return {name: flat, f"{name}_offsets": offsets}


def _padded(name: str, parts: list[tuple[Columns, int, int, int]], lengths: np.ndarray, slot: Staging,
            dtype: np.dtype[Any], pad_to: int | None, pad_value: int) -> dict[str, np.ndarray]:
    n = lengths.size
    width = pad_to if pad_to is not None else int(lengths.max(initial=0))
    padded = slot.array(name, (n, width), dtype)
    uniform = bool(n) and bool((lengths == width).all())
    if not uniform:
        padded.fill(pad_value)
    for columns, begin, end, row in parts:
        values, source = columns.lists[name]
        if uniform:
            padded[begin:end] = values[source[row]:source[row + end - begin]].reshape(end - begin, width)
            continue
        for k in range(end - begin):
            piece = values[source[row + k]:source[row + k + 1]]
            cut = min(piece.size, width)
            padded[begin + k, :cut] = piece[:cut]
    np.minimum(lengths, width, out=lengths)
    return {name: padded, f"{name}_lengths": lengths}


def sample_of(columns: Columns, row: int) -> dict[str, Any]:
    """Row ``row`` as a dict: numbers as numpy scalars, lists and tensors as array views, others as Python values."""
    sample: dict[str, Any] = {name: array[row] for name, array in columns.fixed.items()}
    for name, (values, offsets) in columns.lists.items():
        sample[name] = values[offsets[row]:offsets[row + 1]]
    for name, array in columns.other.items():
        sample[name] = array[row].as_py()
    return sample
