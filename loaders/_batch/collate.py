"""Collate: StreamingDataset samples into the batches Loader makes, for torch's DataLoader."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np

from .list_layout import Lists, check_lists
from .staging import aligned


class Collate:
    """A ``collate_fn`` for ``torch.utils.data.DataLoader`` that builds the batches :class:`Loader` builds.

    Numbers and equal-shaped arrays are stacked into ``(batch, ...)``
    tensors. Lists of numbers of varying length, and ``bytes`` values as
    lists of uint8, are padded (``"pad"``: a ``(batch, width)`` tensor,
    ``width`` being ``pad_to`` or the batch's longest row, longer rows cut,
    plus ``<name>_lengths``) or packed (``"pack"``: the values end to end
    plus ``<name>_offsets``); ``lists="auto"`` packs ``bytes`` and pads
    lists of numbers, as :class:`Loader` does. ``list_fields`` names the
    fields that are lists (see :meth:`StreamingDataset.collate`, which
    knows them from the schema); without it, a field is treated as a list
    when its rows differ in length. Strings and anything else stay Python
    lists. Each batch's arrays share one buffer however many samples it
    holds, so a DataLoader hands it from a worker to the trainer as one
    shared-memory segment instead of pickling every sample's bytes. Tensors
    when torch is installed, numpy arrays otherwise; picklable, for worker
    processes.
    """

    def __init__(self, *, lists: Lists = "auto", pad_to: int | None = None, pad_value: int = 0,
                 list_fields: Iterable[str] | None = None) -> None:
        check_lists(lists, pad_to)
        self.lists: Lists = lists
        self.pad_to = pad_to
        self.pad_value = pad_value
        self.list_fields = None if list_fields is None else frozenset(list_fields)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One batch of ``samples`` (dicts with the same keys)."""
        if not samples:
            raise ValueError("Collate got an empty batch")
        out = _Output()
        for name in samples[0]:
            values = [sample[name] for sample in samples]
            rows = _as_rows(values)
            if rows is None:
                out.batch[name] = values
            elif (name not in self.list_fields) if self.list_fields is not None else _same_shape(rows):
                out.add(name, (len(rows), *rows[0].shape), rows[0].dtype, partial(_stack, rows))
            elif self.lists == "pack" or (self.lists == "auto" and isinstance(values[0], _BYTES)):
                _pack(name, rows, out)
            else:
                _pad(name, rows, out, self.pad_to, self.pad_value)
        return out.finish()


class _Output:
    """A batch being built: its arrays carved out of one buffer, in shared memory inside a DataLoader worker
    (so handing the batch to the trainer copies nothing, as with torch's default collate, and passes one
    file descriptor however many arrays it has), plain memory elsewhere; tensors when torch is installed."""

    def __init__(self) -> None:
        self.batch: dict[str, Any] = {}
        self._arrays: list[tuple[str, tuple[int, ...], np.dtype[Any], Callable[[np.ndarray], None]]] = []

    def add(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any],
            fill: Callable[[np.ndarray], None]) -> None:
        """Make ``batch[name]`` an array of ``shape`` and ``dtype``, written by ``fill`` once :meth:`finish` has
        allocated it."""
        self.batch[name] = None  # keeps the fields' order
        self._arrays.append((name, shape, dtype, fill))

    def finish(self) -> dict[str, Any]:
        """The batch, every array allocated and filled."""
        if not self._arrays:
            return self.batch
        sizes = [int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for _, shape, dtype, _ in self._arrays]
        starts, end = [], 0
        for size in sizes:
            starts.append(aligned(end))
            end = starts[-1] + size
        buffer, torch = _buffer(end)
        for start, size, (name, shape, dtype, fill) in zip(starts, sizes, self._arrays):
            part = buffer[start:start + size]
            if torch is None:
                array = self.batch[name] = part.view(dtype).reshape(shape)
            else:
                tensor = self.batch[name] = part.view(torch.from_numpy(np.empty(0, dtype=dtype)).dtype).view(shape)
                array = tensor.numpy()
            fill(array)
        return self.batch


def _buffer(nbytes: int) -> tuple[Any, Any]:
    """``nbytes`` bytes to carve a batch's arrays from, and torch (None when absent): a numpy array without
    torch, a uint8 tensor with it, in shared memory inside a DataLoader worker."""
    try:
        import torch
        from torch.utils.data import get_worker_info
    except ImportError:
        return np.empty(nbytes, dtype=np.uint8), None
    if get_worker_info() is None:
        return torch.empty(nbytes, dtype=torch.uint8), torch
    # How torch's default collate allocates in a worker: straight into shared memory.
    empty: Any = torch.empty(0, dtype=torch.uint8)
    return empty.new(empty._typed_storage()._new_shared(nbytes, device=empty.device)), torch


_BYTES = (bytes, bytearray, memoryview)


def _as_rows(values: list[Any]) -> list[np.ndarray] | None:
    """The values as numpy arrays (bytes as uint8), or None when they are not all numbers or arrays of one dtype."""
    first = values[0]
    if isinstance(first, _BYTES):
        if not all(isinstance(v, _BYTES) for v in values):
            return None
        return [np.frombuffer(v, dtype=np.uint8) for v in values]
    if isinstance(first, (np.ndarray, np.generic, int, float)) and not isinstance(first, (bool, np.bool_)):
        rows = [np.asarray(v) for v in values]
        if all(r.dtype == rows[0].dtype and r.dtype.kind in "iuf" for r in rows):
            return rows
    if isinstance(first, (bool, np.bool_)) and all(isinstance(v, (bool, np.bool_)) for v in values):
        return [np.asarray(v) for v in values]
    return None


def _same_shape(rows: list[np.ndarray]) -> bool:
    return all(r.shape == rows[0].shape for r in rows)


def _stack(rows: list[np.ndarray], out: np.ndarray) -> None:
    np.stack(rows, out=out)


def _pack(name: str, rows: list[np.ndarray], out: _Output) -> None:
    sizes = [r.size for r in rows]
    out.add(f"{name}_offsets", (len(rows) + 1,), np.dtype(np.int64), partial(_offsets, sizes))
    out.add(name, (sum(sizes),), rows[0].dtype, partial(_concatenate, rows))


def _offsets(sizes: list[int], out: np.ndarray) -> None:
    out[0] = 0
    np.cumsum(sizes, out=out[1:])


def _concatenate(rows: list[np.ndarray], out: np.ndarray) -> None:
    np.concatenate([r.reshape(-1) for r in rows], out=out)


def _pad(name: str, rows: list[np.ndarray], out: _Output, pad_to: int | None, pad_value: int) -> None:
    lengths = np.asarray([r.size for r in rows], dtype=np.int64)
    width = pad_to if pad_to is not None else int(lengths.max())
    kept = np.minimum(lengths, width)
    out.add(name, (len(rows), width), rows[0].dtype, partial(_copy_padded, rows, kept.tolist(), pad_value))
    out.add(f"{name}_lengths", (len(rows),), np.dtype(np.int64), partial(np.copyto, src=kept))


def _copy_padded(rows: list[np.ndarray], kept: list[int], pad_value: int, out: np.ndarray) -> None:
    if all(row.size == out.shape[1] for row in rows):
        np.stack([r.reshape(-1) for r in rows], out=out)
        return
    for target, row, cut in zip(out, rows, kept):
        target[:cut] = row.reshape(-1)[:cut]
        target[cut:] = pad_value
