"""Fresh ``bytes`` objects filled in place, for large reads that must not pay a second copy."""

from __future__ import annotations

import ctypes

_new = ctypes.pythonapi.PyBytes_FromStringAndSize
_new.restype = ctypes.py_object
_new.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_DATA_OFFSET = bytes.__basicsize__ - 1  # where CPython keeps a bytes object's payload


def new_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new, uninitialised ``bytes`` of ``size`` and a writable view of its payload.

    This is the C API's documented way to build a bytes object in place
    (``PyBytes_FromStringAndSize(NULL, n)``): the caller fills every byte
    through the view, drops the view, and only then hands the bytes out. It
    saves a zero-fill and a copy of the whole object, which on large reads
    cost more than the network transfer itself.
    """
    data = _new(None, size)
    array = (ctypes.c_char * size).from_address(id(data) + _DATA_OFFSET)
    return data, memoryview(array).cast("B")
