"""Byte sizes written for people: ``256MB``, ``1GiB``, ``65536``."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15,
          "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
          "ti": 2**40, "tib": 2**40, "pi": 2**50, "pib": 2**50}


def parse_size(size: int | str) -> int:
    """Bytes of ``size``: an int, or text such as ``256MB`` (decimal units) or ``1GiB`` (binary units).

    Raises:
        ValueError: the text is not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE_RE.match(str(size))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{size!r} is not a size (examples: 256MB, 1GiB, 65536)")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{size!r}: a size must be positive")
    return value
