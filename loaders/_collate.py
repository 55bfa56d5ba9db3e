"""Collate: StreamingDataset samples into the batches Loader makes, for torch's DataLoader."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ._lists import Lists, check_lists


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
    lists. Each batch is a few tensors however many samples it holds, so a
    DataLoader hands it from a worker to the trainer in one piece per field
    instead of pickling every sample's bytes. Tensors when torch is
    installed, numpy arrays otherwise; picklable, for worker processes.
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
                np.stack(rows, out=out.array(name, (len(rows), *rows[0].shape), rows[0].dtype))
            elif self.lists == "pack" or (self.lists == "auto" and isinstance(values[0], _BYTES)):
                _pack(name, rows, out)
            else:
                _pad(name, rows, out, self.pad_to, self.pad_value)
        return out.batch


class _Output:
    """A batch being built: arrays in shared memory inside a DataLoader worker (so handing the batch to the
    trainer copies nothing, as with torch's default collate), plain memory elsewhere; tensors when torch is
    installed."""

    def __init__(self) -> None:
        self.batch: dict[str, Any] = {}
        try:
            import torch
            from torch.utils.data import get_worker_info
        except ImportError:
            self._torch = None
            self._shared = False
        else:
            self._torch = torch
            self._shared = get_worker_info() is not None

    def array(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
        """A new array of ``shape`` and ``dtype`` that becomes ``batch[name]``."""
        torch = self._torch
        if torch is None:
            array = np.empty(shape, dtype=dtype)
            self.batch[name] = array
            return array
        kind = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        count = int(np.prod(shape, dtype=np.int64))
        if self._shared:
            # How torch's default collate allocates in a worker: straight into shared memory.
            empty = torch.empty(0, dtype=kind)
            tensor = empty.new(empty._typed_storage()._new_shared(count, device=empty.device)).resize_(shape)
        else:
            tensor = torch.empty(shape, dtype=kind)
        self.batch[name] = tensor
        view: np.ndarray = tensor.numpy()
        return view


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


def _pack(name: str, rows: list[np.ndarray], out: _Output) -> None:
    offsets = out.array(f"{name}_offsets", (len(rows) + 1,), np.dtype(np.int64))
    offsets[0] = 0
    np.cumsum([r.size for r in rows], out=offsets[1:])
    np.concatenate([r.reshape(-1) for r in rows], out=out.array(name, (int(offsets[-1]),), rows[0].dtype))


def _pad(name: str, rows: list[np.ndarray], out: _Output, pad_to: int | None, pad_value: int) -> None:
    lengths = np.asarray([r.size for r in rows], dtype=np.int64)
    width = pad_to if pad_to is not None else int(lengths.max())
    padded = out.array(name, (len(rows), width), rows[0].dtype)
    kept = out.array(f"{name}_lengths", (len(rows),), np.dtype(np.int64))
    np.minimum(lengths, width, out=kept)
    if bool((lengths == width).all()):
        np.stack([r.reshape(-1) for r in rows], out=padded)
        return
    for target, row, cut in zip(padded, rows, kept.tolist()):
        target[:cut] = row.reshape(-1)[:cut]
        target[cut:] = pad_value
