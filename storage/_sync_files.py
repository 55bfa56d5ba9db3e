"""Making many freshly written files durable at once."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from typing import Any

from ._atomic import fsync_dir
from ._libc import libc_function


@functools.lru_cache(maxsize=1)
def _syncfs() -> Any:
    # syncfs reports writeback errors only since Linux 5.8; before that it can
    # lose them, so older kernels fsync file by file instead.
    try:
        major, minor = (int(p) for p in platform.release().split(".")[:2])
    except ValueError:
        return None
    return libc_function("syncfs", [ctypes.c_int]) if (major, minor) >= (5, 8) else None


FSYNC_EACH_MAX = 32
"""Up to this many files and directories are fsync'd one by one; more take one ``syncfs``."""


def sync_files(directory: str, paths: list[str]) -> None:
    """Make ``paths`` and every directory entry under ``directory`` durable.

    A few entries are fsync'd one by one. Many take one ``syncfs`` of the file
    system where the kernel reports its errors: it costs about what one fsync
    does, where thousands of fsyncs cost seconds. (It also flushes other
    writers' data on that file system, which is why it is not used for a few files.)

    Raises:
        OSError: the file system reported a write-back error.
    """
    directories = [root for root, _, _ in os.walk(directory)]
    syncfs = _syncfs()
    if syncfs is not None and len(paths) + len(directories) > FSYNC_EACH_MAX:
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
    for root in directories:
        fsync_dir(root)
