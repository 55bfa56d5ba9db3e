"""xxh3-128 digests: streaming while writing, and checks on read."""

from __future__ import annotations

from typing import TYPE_CHECKING

import xxhash

from .errors import IntegrityError

if TYPE_CHECKING:
    from typing_extensions import Buffer

DIGEST_NAME = "xxh3-128"
"""The name of the digest trainio records, as written in indexes and manifests."""


class Hasher:
    """An incremental xxh3-128 digest over the bytes fed to it, in order.

    ``update`` releases the GIL for large buffers, so hashing can overlap
    other threads' I/O.
    """

    __slots__ = ("_state", "nbytes")

    def __init__(self) -> None:
        self._state = xxhash.xxh3_128()
        self.nbytes = 0

    def update(self, data: Buffer) -> None:
        """Feed the next bytes."""
        view = memoryview(data)
        self._state.update(view)
        self.nbytes += view.nbytes

    def hexdigest(self) -> str:
        """The digest of everything fed so far, as 32 lowercase hex digits."""
        return str(self._state.hexdigest())


def digest(data: Buffer) -> str:
    """The xxh3-128 digest of ``data`` as 32 lowercase hex digits."""
    return str(xxhash.xxh3_128_hexdigest(memoryview(data)))


def check_digest(url: str, key: str, expected: str, actual: str) -> None:
    """Raise :class:`IntegrityError` naming ``url`` and ``key`` unless the digests match."""
    if expected.lower() != actual.lower():
        raise IntegrityError(url, key, expected, actual)
