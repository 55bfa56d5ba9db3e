"""Functions of the C library that Python's os module lacks (Linux), found once."""

from __future__ import annotations

import ctypes
import sys
from typing import Any


def libc_function(name: str, argtypes: list[Any]) -> Any:
    """The C library's ``name`` returning an int, with ``errno`` kept; None off Linux or where it has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True)[name]
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function
