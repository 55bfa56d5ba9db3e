"""Python and numpy values to Arrow columns, strictly: what does not fit the schema is refused, never coerced."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from trainio.storage import SchemaMismatch

_BYTES_LIKE = (bytes, bytearray, memoryview)


def infer_schema(row: Mapping[str, Any]) -> pa.Schema:
    """The schema a first row implies.

    bool, int and float scalars (Python or numpy) map to bool, int64 and
    float64 (numpy scalars keep their dtype); str to string; bytes to binary;
    a 1-D numpy array or a list of numbers to a variable-length list; a numpy
    array of 2 or more dimensions to a fixed-shape tensor of that shape.

    Raises:
        SchemaMismatch: a value has no such mapping.
    """
    return pa.schema([pa.field(name, _infer_type(name, value)) for name, value in row.items()])


def infer_columns_schema(columns: Mapping[str, Any]) -> pa.Schema:
    """The schema a batch of columns implies: Arrow columns keep their type, others follow their first value.

    Raises:
        SchemaMismatch: a column is empty, or its first value has no mapping.
    """
    fields = []
    for name, column in columns.items():
        if isinstance(column, (pa.Array, pa.ChunkedArray)):
            fields.append(pa.field(name, column.type))
            continue
        if len(column) == 0:
            raise SchemaMismatch(name, "at least one value to infer the schema from", 0, "an empty column")
        fields.append(pa.field(name, _infer_type(name, column[0])))
    return pa.schema(fields)


def _infer_type(name: str, value: Any) -> pa.DataType:
    if isinstance(value, (bool, np.bool_)):
        return pa.bool_()
    if isinstance(value, np.generic) and value.dtype.kind in "iuf":
        return pa.from_numpy_dtype(value.dtype)
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, _BYTES_LIKE):
        return pa.binary()
    if isinstance(value, np.ndarray) and value.dtype.kind in "iufb":
        if value.ndim == 1:
            return pa.list_(pa.from_numpy_dtype(value.dtype))
        if value.ndim >= 2:
            return pa.fixed_shape_tensor(pa.from_numpy_dtype(value.dtype), value.shape)
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return pa.list_(pa.float64() if any(isinstance(v, float) for v in value) else pa.int64())
    raise SchemaMismatch(name, "a scalar, str, bytes, a list of numbers or a numpy array", 0, _describe(value))


def column_to_arrow(field: pa.Field, values: Any, first_row: int) -> pa.Array:
    """``values`` (a list of per-row values, a numpy array or an Arrow array) as an Arrow array of ``field``'s type.

    Raises:
        SchemaMismatch: naming the field, its type and the first row (counted
            from ``first_row``) whose value does not fit.
    """
    kind = field.type
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return _cast_arrow(field, values, first_row)
    if isinstance(kind, pa.FixedShapeTensorType):
        return _tensor_column(field, kind, values, first_row)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _list_column(field, kind, values, first_row)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return _numeric_column(field, values, first_row)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _checked(field, values, first_row, lambda v: isinstance(v, str))
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return _checked(field, [bytes(v) if isinstance(v, (bytearray, memoryview)) else v for v in values],
                        first_row, lambda v: isinstance(v, bytes))
    try:
        return pa.array(values, type=kind)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise SchemaMismatch(field.name, str(kind), -1, str(exc)) from exc


def _cast_arrow(field: pa.Field, values: pa.Array | pa.ChunkedArray, first_row: int) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        # combine_chunks() copies even a lone chunk, and every column written as a table comes here.
        values = values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()
    if values.type == field.type:
        return values
    try:
        return values.cast(field.type, safe=True)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise SchemaMismatch(field.name, str(field.type), first_row, f"a column of {values.type}") from exc


def _numeric_column(field: pa.Field, values: Any, first_row: int) -> pa.Array:
    kind = field.type
    allowed = _allowed_kinds(kind)
    array = values if isinstance(values, np.ndarray) else _as_numpy(values)
    # numpy silently turns bools among ints into ints: look for them in Python values
    sneaky_bools = allowed != "b" and not isinstance(values, np.ndarray) and any(
        isinstance(v, (bool, np.bool_)) for v in values)
    if array.ndim == 1 and array.dtype.kind in allowed and not sneaky_bools:
        try:
            return pa.array(array).cast(kind, safe=True)
        except pa.ArrowInvalid:
            pass
    bad = max(0, _first_bad(values, lambda v: _scalar_kind(v) in allowed and _fits(v, kind)))
    raise SchemaMismatch(field.name, str(kind), first_row + bad, _describe(values[bad]))


def _list_column(field: pa.Field, kind: pa.DataType, values: Any, first_row: int) -> pa.Array:
    allowed = _allowed_kinds(kind.value_type)
    rows = [values[i] for i in range(len(values))] if isinstance(values, np.ndarray) else list(values)
    flat: list[np.ndarray] = []
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    for i, row in enumerate(rows):
        items = row if isinstance(row, np.ndarray) else _as_numpy(row) if isinstance(row, (list, tuple)) else None
        if items is None or items.ndim != 1 or (len(items) and items.dtype.kind not in allowed):
            raise SchemaMismatch(field.name, str(kind), first_row + i, _describe(row))
        flat.append(items)
        offsets[i + 1] = offsets[i] + len(items)
    merged = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
    try:
        items_array = pa.array(merged).cast(kind.value_type, safe=True) if len(merged) else \
            pa.array([], type=kind.value_type)
    except pa.ArrowInvalid as exc:
        bad_item = max(0, _first_bad(merged, lambda v: _fits(v, kind.value_type)))
        bad = int(np.searchsorted(offsets, bad_item, side="right")) - 1
        raise SchemaMismatch(field.name, str(kind), first_row + bad,
                             f"a list holding {_describe(merged[bad_item])}, out of range") from exc
    array_type = pa.LargeListArray if pa.types.is_large_list(kind) else pa.ListArray
    offset_type = np.int64 if pa.types.is_large_list(kind) else np.int32
    return array_type.from_arrays(pa.array(offsets.astype(offset_type)), items_array, type=kind)


def _allowed_kinds(kind: pa.DataType) -> str:
    """The numpy dtype kinds a column of Arrow type ``kind`` accepts without losing information."""
    if pa.types.is_boolean(kind):
        return "b"
    if pa.types.is_integer(kind):
        return "iu"
    if pa.types.is_floating(kind):
        return "iuf"
    return ""


def _tensor_column(field: pa.Field, kind: pa.FixedShapeTensorType, values: Any, first_row: int) -> pa.Array:
    shape = tuple(kind.shape)
    dtype = np.dtype(kind.value_type.to_pandas_dtype())
    expected = f"a {dtype.name} tensor of shape {shape}"
    if isinstance(values, np.ndarray) and values.shape[1:] == shape:
        rows: list[Any] = [values]
        stacked = values
    else:
        rows = list(values)
        for i, row in enumerate(rows):
            if not isinstance(row, np.ndarray) or row.shape != shape or not _castable(row.dtype, dtype):
                raise SchemaMismatch(field.name, expected, first_row + i, _describe(row))
        stacked = np.stack(rows) if rows else np.zeros((0, *shape), dtype=dtype)
    if not _castable(stacked.dtype, dtype):
        raise SchemaMismatch(field.name, expected, first_row, _describe(stacked))
    if dtype.kind in "iu" and stacked.size and stacked.dtype != dtype:
        info = np.iinfo(dtype)
        outside = (stacked < info.min) | (stacked > info.max)
        if outside.any():
            bad = int(np.argmax(outside.reshape(len(stacked), -1).any(axis=1)))
            raise SchemaMismatch(field.name, expected, first_row + bad, "values out of range")
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(stacked, dtype=dtype))


def _castable(source: np.dtype[Any], target: np.dtype[Any]) -> bool:
    """Whether values of ``source`` belong in a ``target`` column (range is checked separately)."""
    return source.kind in _ALLOWED_BY_KIND[target.kind]


_ALLOWED_BY_KIND = {"b": "b", "i": "iu", "u": "iu", "f": "iuf", "c": "iufc"}


def _checked(field: pa.Field, values: Any, first_row: int, ok: Any) -> pa.Array:
    bad = _first_bad(values, lambda v: v is None or ok(v))
    if bad >= 0:
        raise SchemaMismatch(field.name, str(field.type), first_row + bad, _describe(values[bad]))
    return pa.array(values, type=field.type)


def _as_numpy(values: Sequence[Any]) -> np.ndarray:
    try:
        return np.asarray(values)
    except (ValueError, TypeError):
        return np.asarray(values, dtype=object)


def _scalar_kind(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "b"
    if isinstance(value, (int, np.integer)):
        return "i"
    if isinstance(value, (float, np.floating)):
        return "f"
    return "?"


def _fits(value: Any, kind: pa.DataType) -> bool:
    try:
        pa.array([value]).cast(kind, safe=True)
    except (pa.ArrowException, OverflowError):
        return False
    return True


def _first_bad(values: Any, ok: Any) -> int:
    """The index of the first value ``ok`` refuses, or -1."""
    for i, value in enumerate(values):
        if not ok(value):
            return i
    return -1


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"
