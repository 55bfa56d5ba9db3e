"""Formatting for people and for --json: sizes, rates, values."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

import numpy as np

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "p": 10**15, "pb": 10**15,
          "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
          "ti": 2**40, "tib": 2**40, "pi": 2**50, "pib": 2**50}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``256MB`` (decimal), ``1GiB`` (binary) or ``65536``.

    Raises:
        argparse.ArgumentTypeError: the text is not a size.
    """
    match = _SIZE_RE.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 256MB, 1GiB, 65536)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be positive")
    return value


def human_bytes(n: float) -> str:
    """``1.5 GB``-style text for a byte count (decimal units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def short_value(value: Any, width: int = 28) -> str:
    """A one-line rendering of a row's value for a table."""
    if isinstance(value, np.ndarray):
        if value.ndim == 1:
            head = " ".join(str(v) for v in value[:6])
            text = f"[{head}{' …' if value.size > 6 else ''}] ({value.size})"
        else:
            text = f"{value.dtype}{list(value.shape)}"
    elif isinstance(value, bytes):
        text = f"<{human_bytes(len(value))}>"
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def json_value(value: Any) -> Any:
    """A JSON-safe rendering of a row's value: small arrays in full, big ones by dtype and shape."""
    if isinstance(value, np.ndarray):
        if value.size <= 64:
            return value.tolist()
        return {"dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    return value


def print_json(document: Any) -> None:
    """Print one JSON document to stdout."""
    json.dump(document, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
