"""Validation of store keys, prefixes and byte ranges, done once for every backend."""

from __future__ import annotations

import re

from .errors import InvalidKey, StoreError

TEMP_MARKER = ".trainio-tmp."
"""Names starting with this are in-flight temporary files, never keys."""

_SUSPECT = re.compile(r"[\x00-\x1f\x7f\\]|(?:^|/)" + re.escape(TEMP_MARKER))
"""A control character, a backslash, or a part that starts with the temp-file marker (:func:`_check_part`)."""


def check_key(url: str, key: object) -> str:
    """Return ``key`` if it is a valid store key, else raise :class:`InvalidKey`.

    A valid key is a non-empty, relative, '/'-separated string whose parts are
    non-empty, are neither '.' nor '..', hold no backslash or control
    character, and do not start with the temporary-file marker; it must
    encode as UTF-8.
    """
    if not isinstance(key, str):
        raise InvalidKey(url, repr(key), f"a key must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKey(url, key, "a key must not be empty")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKey(url, key, "a key must be valid UTF-8 (it holds a lone surrogate)") from None
    if key.startswith("/"):
        raise InvalidKey(url, key, "a key must be relative, not start with '/'")
    parts = key.split("/")
    if _SUSPECT.search(key) or "" in parts or "." in parts or ".." in parts:  # one of them is refused: say which
        for part in parts:
            _check_part(url, key, part)
    return key


def check_prefix(url: str, prefix: object) -> str:
    """Return ``prefix`` normalised to "" or a valid key without a trailing '/'.

    Raises:
        InvalidKey: the prefix is not "" and not a valid key (a single
            trailing '/' is allowed and dropped).
    """
    if prefix == "":
        return ""
    if isinstance(prefix, str) and prefix.endswith("/"):
        prefix = prefix[:-1]
    return check_key(url, prefix)


def _check_part(url: str, key: str, part: str) -> None:
    if part == "":
        raise InvalidKey(url, key, "a key must not have empty parts ('//' or a trailing '/')")
    if part in (".", ".."):
        raise InvalidKey(url, key, f"a key must not contain the part {part!r}")
    if "\\" in part:
        raise InvalidKey(url, key, f"part {part!r} contains a backslash")
    bad = next((c for c in part if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise InvalidKey(url, key, f"part {part!r} contains the control character {bad!r}")
    if part.startswith(TEMP_MARKER):
        raise InvalidKey(url, key, f"part {part!r} starts with {TEMP_MARKER!r}, reserved for temp files")


def check_range(url: str, key: str, start: int | None, end: int | None) -> tuple[int, int | None]:
    """Return (start, end) with start defaulted to 0; ``end`` None means to the end.

    Raises:
        StoreError: a bound is negative, not an int, or ``end < start``.
    """
    lo = 0 if start is None else start
    for name, value in (("start", lo), ("end", end)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise StoreError(url, key, f"byte range {name}={value!r} must be a non-negative int")
    if end is not None and end < lo:
        raise StoreError(url, key, f"byte range [{lo}, {end}) has end before start")
    return lo, end


def check_bounds(url: str, key: str, start: int, end: int | None, size: int) -> int:
    """Return the resolved end of [start, end) for an object of ``size`` bytes.

    Raises:
        StoreError: the range reaches past the end of the object.
    """
    stop = size if end is None else end
    if start > size or stop > size:
        raise StoreError(
            url, key, f"byte range [{start}, {stop}) is outside the object's {size} bytes",
            "the object is shorter than expected: truncated or replaced",
        )
    return stop
