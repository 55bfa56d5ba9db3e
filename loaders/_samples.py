"""Rows of a record batch as dicts of numpy values, through zero-copy views made once per batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from ._dataset import value_at

Accessor = Callable[[int], Any]


def row_accessors(batch: pa.RecordBatch) -> list[tuple[str, Accessor]]:
    """For each field, a function from a row number to that row's value.

    Numbers come as numpy scalars, variable-length lists as 1-D arrays and
    fixed-shape tensors as arrays of their shape, all views into the batch
    (no copy); strings as ``str`` and binary as ``bytes``; nulls as None.
    """
    return [(name, _accessor(batch.column(i))) for i, name in enumerate(batch.schema.names)]


def _accessor(column: pa.Array) -> Accessor:
    kind = column.type
    if column.null_count:
        return lambda i: value_at(column, i) if column[i].is_valid else None
    if isinstance(kind, pa.FixedShapeTensorType):
        tensors = column.to_numpy_ndarray()
        return tensors.__getitem__  # type: ignore[no-any-return]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        values = column.values.to_numpy(zero_copy_only=False)
        offsets = column.offsets.to_numpy()
        return lambda i: values[offsets[i]:offsets[i + 1]]
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        array = column.to_numpy(zero_copy_only=False)
        return array.__getitem__  # type: ignore[no-any-return]
    return lambda i: column[i].as_py()
