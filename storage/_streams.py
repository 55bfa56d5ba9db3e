"""Streams that hash every byte on its way through, for the stores' streamed copies."""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

from ._atomic import write_all
from ._hashing import Hasher

if TYPE_CHECKING:
    from typing_extensions import Buffer


class HashingReader:
    """A readable source that hashes every byte read from it, in order."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.hasher = Hasher()

    def readinto(self, buffer: memoryview) -> int:
        """Fill ``buffer`` from the source as far as it goes; 0 at the end."""
        filled = 0
        while filled < buffer.nbytes:
            n = self._raw.readinto(buffer[filled:])  # type: ignore[attr-defined]
            if not n:
                break
            filled += n
        self.hasher.update(buffer[:filled])
        return filled

    def fileno(self) -> int:
        """The source's file descriptor, for copies the kernel can do (the caller then feeds ``hasher``)."""
        return self._raw.fileno()


class HashingWriter:
    """A sink that hashes every byte written to it, in order, then writes it to a file."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.hasher = Hasher()

    def write(self, data: Buffer) -> None:
        """Write all of ``data``."""
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        write_all(self._raw, view)

    def fileno(self) -> int:
        """The sink's file descriptor, for copies the kernel can do (the caller then feeds ``hasher``)."""
        return self._raw.fileno()
