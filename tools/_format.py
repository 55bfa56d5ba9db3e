"""Formatting for people and for --json: sizes, rates, values."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from trainio.loaders import parse_size as _parse_size


def parse_size(text: str) -> int:
    """Bytes of a size such as ``256MB`` (decimal), ``1GiB`` (binary) or ``65536``, for argparse.

    Raises:
        argparse.ArgumentTypeError: the text is not a size.
    """
    try:
        return _parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


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
