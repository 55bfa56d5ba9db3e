"""Zero-copy numpy views of a record batch's columns, and one row of them as a sample dict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from trainio.storage import FormatError


@dataclass(frozen=True, slots=True)
class Columns:
    """Zero-copy numpy views of one record batch, per field.

    ``fixed[name]`` has rows on its first axis (scalars: 1-D; tensors and
    fixed-size binary: N-D); ``lists[name]`` is ``(values, offsets)`` for
    lists of numbers (and, with ``binary_as_lists``, binary as uint8);
    ``other[name]`` is the Arrow array itself (strings, binary, nested
    types, columns with nulls).
    """

    fixed: dict[str, np.ndarray]
    lists: dict[str, tuple[np.ndarray, np.ndarray]]
    other: dict[str, pa.Array]

    @classmethod
    def of(cls, batch: pa.RecordBatch, *, binary_as_lists: bool = False, source: tuple[str, str] = ("", "")) -> Columns:
        """The views of ``batch``, read from shard ``source`` (url, key), which error messages name.

        Raises:
            FormatError: a list or binary column's offsets point outside its
                values, or a column's buffers are not what its type needs
                (bytes not yet checked against their digests may be damaged).
        """
        fixed, lists, other = {}, {}, {}
        for name, column in zip(batch.schema.names, batch.columns):
            kind = column.type
            try:
                if column.null_count:
                    other[name] = column
                elif isinstance(kind, pa.FixedShapeTensorType):
                    fixed[name] = column.to_numpy_ndarray()
                elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _is_numeric(kind.value_type):
                    lists[name] = _checked(source, name, _numbers(column.values), _numbers(column.offsets))
                elif _is_numeric(kind):
                    fixed[name] = _numbers(column)
                elif binary_as_lists and pa.types.is_fixed_size_binary(kind):
                    fixed[name] = _fixed_binary(column)
                elif binary_as_lists and (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
                    lists[name] = _binary(source, name, column)
                else:
                    other[name] = column
            except FormatError:
                raise
            except (pa.ArrowException, ValueError) as exc:
                raise FormatError(*source, f"field {name!r} does not decode ({exc})",
                                  "the shard is corrupt: run trainio verify") from exc
        return cls(fixed, lists, other)


def _is_numeric(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind))


def _numbers(array: pa.Array) -> np.ndarray:
    """The values of a numeric array: a view of its buffer (booleans, one bit each, and arrays with nulls copied).

    Not ``Array.to_numpy``, which imports pandas: a third of a second in every new worker process.

    Raises:
        ValueError: the buffer is shorter than the array's length needs.
    """
    kind = array.type
    if pa.types.is_boolean(kind) or array.null_count:
        return np.asarray(array.to_numpy(zero_copy_only=False))
    dtype = np.dtype(kind.to_pandas_dtype())
    data = array.buffers()[1]
    if data is None:
        return np.zeros(0, dtype)
    return np.frombuffer(data, dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _checked(source: tuple[str, str], name: str, values: np.ndarray,
             offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, offsets)`` once every row is known to lie inside ``values``."""
    if offsets.size and (offsets[0] < 0 or offsets[-1] > values.size or bool((np.diff(offsets) < 0).any())):
        raise FormatError(*source, f"field {name!r}: list offsets point outside the column's values",
                          "the shard is corrupt: run trainio verify")
    return values, offsets


def _fixed_binary(column: pa.Array) -> np.ndarray:
    width = column.type.byte_width
    data = column.buffers()[1]
    flat = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return flat[column.offset * width:(column.offset + len(column)) * width].reshape(len(column), width)


def _binary(source: tuple[str, str], name: str, column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    _, offsets, data = column.buffers()
    assert offsets is not None
    offsets_view = np.frombuffer(offsets, dtype=offset_type)[column.offset:column.offset + len(column) + 1]
    values = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return _checked(source, name, values, offsets_view)


def sample_of(columns: Columns) -> Callable[[int], dict[str, Any]]:
    """A function giving row ``row`` of ``columns`` as a dict: numbers as numpy scalars, lists and tensors as array
    views, others as Python values. It runs once per sample, so it is built for the columns there are."""
    fixed = tuple(columns.fixed.items())
    lists = tuple((name, values, offsets.data) for name, (values, offsets) in columns.lists.items())
    other = tuple(columns.other.items())
    if len(lists) == 1 and not fixed and not other:
        ((name, values, offsets),) = lists
        return lambda row: {name: values[offsets[row]:offsets[row + 1]]}

    def sample(row: int) -> dict[str, Any]:
        found = {name: array[row] for name, array in fixed}
        for name, values, offsets in lists:
            found[name] = values[offsets[row]:offsets[row + 1]]
        for name, array in other:
            found[name] = array[row].as_py()
        return found

    return sample
