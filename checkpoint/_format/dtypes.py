"""Which element types a checkpoint holds, and how each is stored in zarr v3.

zarr v3 names the usual numeric types; the rest (bfloat16, the float8 family,
complex32) are stored as unsigned integers of the same width, their true type
kept in the manifest and in the array's attributes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ZARR_NATIVE = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
})
"""Type names zarr v3 stores as themselves."""

_NUMPY_KINDS = frozenset("biufc")


def stored_dtype(name: str, itemsize: int) -> str:
    """The zarr data type a tensor of element type ``name`` is written as."""
    if name in ZARR_NATIVE:
        return name
    return f"uint{8 * itemsize}"


def torch_dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> Any:
    """The torch dtype called ``name``; ValueError when this torch has none."""
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"this torch ({torch.__version__}) has no dtype {name!r}")
    return dtype


def numpy_dtype_name(dtype: np.dtype[Any]) -> str | None:
    """The stored name of a numpy dtype, or None when a checkpoint cannot hold it."""
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        return None
    name = dtype.newbyteorder("=").name if dtype.byteorder == ">" else dtype.name
    return name if name in ZARR_NATIVE else None


def storage_numpy_dtype(stored: str) -> np.dtype[Any]:
    """The little-endian numpy dtype of a stored zarr type."""
    return np.dtype(stored).newbyteorder("<")
