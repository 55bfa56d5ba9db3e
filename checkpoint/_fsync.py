"""Making many freshly written files durable at once."""

from __future__ import annotations

import ctypes
import functools
import os
import platform

from trainio.storage._atomic import fsync_dir


@functools.lru_cache(maxsize=1)
def _syncfs() -> ctypes._NamedFuncPointer | None:
    # syncfs reports writeback errors only since Linux 5.8; before that it can
    # lose them, so older kernels fsync file by file instead.
    if platform.system() != "Linux":
        return None
    try:
        major, minor = (int(p) for p in platform.release().split(".")[:2])
    except ValueError:
        return None
    if (major, minor) < (5, 8):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def sync_files(directory: str, paths: list[str]) -> None:
    """Make ``paths`` and every directory entry under ``directory`` durable.

    One ``syncfs`` of the file system where the kernel reports its errors,
    which costs about what one fsync does; else an fsync per file and directory.

    Raises:
        OSError: the file system reported a write-back error.
    """
    syncfs = _syncfs()
    if syncfs is not None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), directory)
        finally:
            os.close(fd)
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for root, _, _ in os.walk(directory):
        fsync_dir(root)
