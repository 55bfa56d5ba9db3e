"""Every single-bit flip of a document: what the integrity tests feed the readers."""

from __future__ import annotations

from collections.abc import Iterator


def bit_flips(data: bytes) -> Iterator[bytes]:
    """``data`` with one bit flipped, for every bit of it in turn."""
    for position in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            yield bytes(damaged)
