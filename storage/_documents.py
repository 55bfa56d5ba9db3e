"""Sealed JSON documents: a digest inside each document that decides what is read, checked before it is believed.

A sealed document is ordinary JSON whose last top-level member is
``"document_xxh3_128": "<32 hex digits>"``: the xxh3-128 of the document's
exact bytes with those 32 digits written as zeros. Any reader sees plain JSON;
trainio checks the seal over the bytes before parsing, so a flipped bit
anywhere (a key, a number, whitespace, the digest itself) is caught, not
parsed into a plausible wrong value. Parsing is bounded in size and depth, so
a hostile document is a clean :class:`FormatError`, never a hang, a
``RecursionError`` or a ``MemoryError``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ._hashing import digest
from .errors import FormatError

SEAL_FIELD = "document_xxh3_128"
"""The top-level member of a sealed document that holds its digest."""

MAX_DOCUMENT_BYTES = 1 << 30
"""The largest document trainio parses (1 GiB): a manifest of millions of files fits."""

MAX_DEPTH = 256
"""The deepest nesting of arrays and objects a document may have."""

_ZEROS = b"0" * 32
_SEAL = re.compile(rb'"' + SEAL_FIELD.encode() + rb'":\s*"([0-9a-f]{32})"\s*\}\s*\Z')


def seal_json(document: dict[str, Any], *, indent: int | None = None) -> bytes:
    """``document`` as sealed JSON bytes (it must not hold the seal field already).

    With ``indent`` None the JSON is compact; NaN and infinities are refused.
    """
    if SEAL_FIELD in document:
        raise ValueError(f"the document already has a {SEAL_FIELD!r} member")
    separators = (",", ":") if indent is None else (",", ": ")
    body = json.dumps({**document, SEAL_FIELD: _ZEROS.decode()}, indent=indent, separators=separators,
                      allow_nan=False).encode()
    start = body.rindex(_ZEROS)
    return body[:start] + digest(body).encode() + body[start + 32:]


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` ends with a seal (checked or not)."""
    return _SEAL.search(data[-200:]) is not None


def check_seal(data: bytes, url: str, key: str) -> None:
    """Raise :class:`FormatError` naming ``url`` and ``key`` unless ``data`` carries a seal that matches it."""
    found = _SEAL.search(data, max(0, len(data) - 200))
    if found is None:
        raise FormatError(url, key, f"has no {SEAL_FIELD!r} as its last member: it is damaged, truncated or "
                          "not written by trainio", "restore or rebuild it from a good copy")
    start = found.start(1)
    zeroed = data[:start] + _ZEROS + data[start + 32:]
    actual = digest(zeroed)
    if actual != found.group(1).decode():
        raise FormatError(url, key, f"its {SEAL_FIELD} is {found.group(1).decode()} but its bytes hash to "
                          f"{actual}: the document is damaged", "restore or rebuild it from a good copy")


def parse_json(data: bytes, url: str, key: str, *, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """``data`` parsed as JSON, within ``max_bytes`` and :data:`MAX_DEPTH` levels of nesting.

    Raises:
        FormatError: too large, too deep, not UTF-8 or not JSON; the message
            names ``url`` and ``key``.
    """
    if len(data) > max_bytes:
        raise FormatError(url, key, f"is {len(data)} bytes, more than the {max_bytes} a document may have")
    try:
        document = json.loads(data)
    except RecursionError:
        raise FormatError(url, key, f"is nested more than {MAX_DEPTH} levels deep") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(url, key, f"is not valid JSON: {exc}") from None
    _check_depth(document, url, key)
    return document


def load_sealed(data: bytes, url: str, key: str, *, max_bytes: int = MAX_DOCUMENT_BYTES) -> dict[str, Any]:
    """The sealed JSON object ``data``, its seal checked before it is parsed (the seal member removed).

    Raises:
        FormatError: no seal, a seal that does not match, or a document that
            is too large, too deep, not JSON or not an object.
    """
    if len(data) > max_bytes:
        raise FormatError(url, key, f"is {len(data)} bytes, more than the {max_bytes} a document may have")
    check_seal(data, url, key)
    document = parse_json(data, url, key, max_bytes=max_bytes)
    if not isinstance(document, dict):
        raise FormatError(url, key, "is not a JSON object")
    document.pop(SEAL_FIELD, None)
    return document


def _check_depth(document: Any, url: str, key: str) -> None:
    level: list[Any] = [document]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise FormatError(url, key, f"is nested more than {MAX_DEPTH} levels deep")
        following: list[Any] = []
        for value in level:
            if isinstance(value, dict):
                following.extend(v for v in value.values() if isinstance(v, (dict, list)))
            elif isinstance(value, list):
                following.extend(v for v in value if isinstance(v, (dict, list)))
        level = following
