"""Files in one message between ranks: a header listing each file's key, size and xxh3-128, then their bytes."""

from __future__ import annotations

import json
import struct

from trainio.storage import CheckpointError, digest

from .._format.checks import FileEntry

_LENGTH = struct.Struct("<Q")

ROUND_BYTES = 256 << 20
"""The most file bytes one message carries (more go in further rounds), so a transfer's memory stays bounded."""


def rounds(sizes: dict[str, int]) -> list[list[str]]:
    """The keys of ``sizes`` in batches of at most :data:`ROUND_BYTES` (a bigger file alone in its batch)."""
    batches: list[list[str]] = []
    total = 0
    for key, size in sizes.items():
        if not batches or total + size > ROUND_BYTES:
            batches.append([])
            total = 0
        batches[-1].append(key)
        total += size
    return batches


def bundle(files: dict[str, tuple[FileEntry, bytes]]) -> bytes:
    """``files`` (key: its entry and bytes) as one message."""
    header = json.dumps([[key, entry.size, entry.xxh3] for key, (entry, _) in files.items()]).encode()
    return b"".join([_LENGTH.pack(len(header)), header, *(data for _, data in files.values())])


def unbundle(message: bytes | memoryview, sender: str) -> dict[str, tuple[FileEntry, memoryview]]:
    """The files of a message from ``sender``, each checked against the size and digest it was sent with.

    Raises:
        CheckpointError: the message is malformed or a file's bytes are not what its sender hashed.
    """
    view = memoryview(message)
    try:
        (length,) = _LENGTH.unpack_from(view)
        listed = json.loads(bytes(view[_LENGTH.size:_LENGTH.size + length]))
        start = _LENGTH.size + length
        files: dict[str, tuple[FileEntry, memoryview]] = {}
        for key, size, xxh3 in listed:
            data = view[start:start + size]
            if data.nbytes != size:
                raise ValueError(f"{key!r} is cut short")
            files[str(key)] = (FileEntry(int(size), str(xxh3)), data)
            start += size
        if start != view.nbytes:
            raise ValueError(f"{view.nbytes - start} bytes after the last file")
    except (ValueError, TypeError, struct.error) as exc:
        raise CheckpointError(f"the files sent by {sender} are malformed: {exc}") from None
    for key, (entry, data) in files.items():
        actual = digest(data)
        if actual != entry.xxh3:
            raise CheckpointError(f"file {key!r} sent by {sender} arrived damaged: xxh3-128 {actual}, sent as "
                                  f"{entry.xxh3}")
    return files
