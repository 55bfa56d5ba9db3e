"""Collate: StreamingDataset samples into the batches Loader makes, for torch's DataLoader."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ._assemble import Lists


class Collate:
    """A ``collate_fn`` for ``torch.utils.data.DataLoader`` that builds the batches :class:`Loader` builds.

    Numbers and equal-shaped arrays are stacked into ``(batch, ...)``
    tensors. Lists of numbers of varying length, and ``bytes`` values as
    lists of uint8, are padded (``lists="pad"``: a ``(batch, width)`` tensor,
    ``width`` being ``pad_to`` or the batch's longest row, longer rows cut,
    plus ``<name>_lengths``) or packed (``lists="pack"``: the values end to
    end plus ``<name>_offsets``). ``list_fields`` names the fields that are
    lists (see :meth:`StreamingDataset.collate`, which knows them from the
    schema); without it, a field is treated as a list when its rows differ
    in length. Strings and anything else stay Python lists. Each batch is a few tensors however many samples it holds, so a
    DataLoader hands it from a worker to the trainer in one piece per field
    instead of pickling every sample's bytes. Tensors when torch is
    installed, numpy arrays otherwise; picklable, for worker processes.
    """

    def __init__(self, *, lists: Lists = "pad", pad_to: int | None = None, pad_value: int = 0,
                 list_fields: Iterable[str] | None = None) -> None:
        if lists not in ("pad", "pack"):
            raise ValueError(f"lists={lists!r}: must be 'pad' or 'pack'")
        if pad_to is not None and pad_to < 0:
            raise ValueError(f"pad_to={pad_to}: must be >= 0")
        self.lists: Lists = lists
        self.pad_to = pad_to
        self.pad_value = pad_value
        self.list_fields = None if list_fields is None else frozenset(list_fields)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One batch of ``samples`` (dicts with the same keys)."""
        if not samples:
            raise ValueError("Collate got an empty batch")
        out: dict[str, Any] = {}
        for name in samples[0]:
            values = [sample[name] for sample in samples]
            rows = _as_rows(values)
            if rows is None:
                out[name] = values
            elif (name not in self.list_fields) if self.list_fields is not None else _same_shape(rows):
                out[name] = np.stack(rows)
            elif self.lists == "pack":
                out[name], out[f"{name}_offsets"] = _pack(rows)
            else:
                out[name], out[f"{name}_lengths"] = _pad(rows, self.pad_to, self.pad_value)
        return _tensors(out)


def _as_rows(values: list[Any]) -> list[np.ndarray] | None:
    """The values as numpy arrays (bytes as uint8), or None when they are not all numbers or arrays of one dtype."""
    first = values[0]
    if isinstance(first, (bytes, bytearray, memoryview)):
        if not all(isinstance(v, (bytes, bytearray, memoryview)) for v in values):
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


def _pack(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.asarray([r.size for r in rows], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    return np.concatenate([r.reshape(-1) for r in rows]), offsets


def _pad(rows: list[np.ndarray], pad_to: int | None, pad_value: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.asarray([r.size for r in rows], dtype=np.int64)
    width = pad_to if pad_to is not None else int(lengths.max())
    if bool((lengths == width).all()):
        return np.stack([r.reshape(-1) for r in rows]), lengths
    padded = np.full((len(rows), width), pad_value, dtype=rows[0].dtype)
    for target, row in zip(padded, rows):
        cut = min(row.size, width)
        target[:cut] = row.reshape(-1)[:cut]
    return padded, np.minimum(lengths, width)


def _tensors(batch: dict[str, Any]) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return batch
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
