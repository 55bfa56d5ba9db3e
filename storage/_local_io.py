"""System calls on local files, exactly: whole preads, kernel copies, the real path behind a descriptor."""

from __future__ import annotations

import errno
import os

from ._hashing import Hasher
from .errors import StoreError

_NO_KERNEL_COPY_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def opened_path(fd: int) -> str | None:
    """The path the kernel resolved for the open ``fd`` (Linux), or None where it cannot say."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return path if path.startswith("/") and not path.endswith(" (deleted)") else None


def pread_exact(fd: int, offset: int, size: int, url: str, key: str) -> bytes:
    """``size`` bytes of ``fd`` from ``offset``, however many reads it takes.

    Raises:
        StoreError: the file ends first (it was truncated while being read).
    """
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    buffer = bytearray(size)
    view = memoryview(buffer)
    view[: len(data)] = data
    preadv_exact(fd, view[len(data):], offset + len(data), url, key)
    return bytes(buffer)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write all of ``data`` at ``offset`` of ``fd``, however many writes it takes; the bytes written."""
    view = memoryview(data)
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def preadv_exact(fd: int, buffer: memoryview, offset: int, url: str, key: str) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset``, however many reads it takes.

    Raises:
        StoreError: the file ends first (it was truncated while being read).
    """
    filled = 0
    total = buffer.nbytes
    while filled < total:
        n = os.preadv(fd, [buffer[filled:]], offset + filled)
        if n == 0:
            raise StoreError(url, key, f"the file ended at byte {offset + filled} while reading", "it was truncated while being read")
        filled += n


def kernel_copy(src: int, dst: int, size: int, hasher: Hasher, block: memoryview) -> bool:
    """Copy bytes [0, size) of ``src`` to the start of ``dst`` inside the kernel, feeding ``hasher``.

    Each block is hashed by reading it back from the page cache, which the
    copy has just filled; the data never takes a second trip through user
    space. Returns False, having copied nothing, where the kernel or the file
    systems cannot do it, so the caller copies the plain way.
    """
    if not hasattr(os, "copy_file_range") or size == 0:
        return False
    offset = 0
    while offset < size:
        try:
            n = os.copy_file_range(src, dst, min(block.nbytes, size - offset), offset, offset)
        except OSError as exc:
            if offset == 0 and exc.errno in _NO_KERNEL_COPY_ERRNOS:
                return False
            raise
        if n == 0:
            raise OSError(errno.EIO, f"the source ended at byte {offset} of {size} during the copy")
        view = block[:n]
        filled = 0
        while filled < n:
            got = os.preadv(src, [view[filled:]], offset + filled)
            if not got:
                raise OSError(errno.EIO, f"the source ended at byte {offset + filled} while hashing")
            filled += got
        hasher.update(view)
        offset += n
    return True
