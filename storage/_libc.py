"""Functions of the C library that Python's os module lacks (Linux), found once."""

from __future__ import annotations

import ctypes
import sys
from typing import Any


def libc_function(name: str, argtypes: list[Any], *, restype: Any = ctypes.c_int, hold_gil: bool = False) -> Any:
    """The C library's ``name`` returning ``restype``, with ``errno`` kept; None off Linux or where it has none.

    With ``hold_gil``, a call keeps the GIL: for calls that return in microseconds, which after giving the GIL up
    could wait a switch interval (5 ms) behind busy threads to take it back.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = (ctypes.PyDLL if hold_gil else ctypes.CDLL)(None, use_errno=True)[name]
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = restype
    return function
