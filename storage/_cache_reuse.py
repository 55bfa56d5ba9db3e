"""Cached files checked against their digests before each process first uses them.

A ShardCache does not fsync its downloads by default: a power loss before
the kernel writes one back can leave it damaged, and a disk can damage it
later. So a process believes a cached file only once it has hashed it (or
downloaded it) itself; the file is known by its path and inode.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading

from ._hashing import digest

log = logging.getLogger("trainio.storage.cache")

_checked: set[tuple[str, int, int, int]] = set()  # (path, device, inode, size) of cached files checked here
_checked_lock = threading.Lock()


def _after_fork() -> None:
    global _checked_lock
    _checked_lock = threading.Lock()  # a thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_after_fork)


def checked_here(path: str, status: os.stat_result) -> None:
    """Record that the file at ``path`` (as ``status`` identifies it) matches its digest, in this process."""
    with _checked_lock:
        _checked.add((path, status.st_dev, status.st_ino, status.st_size))


def still_good(key: str, path: str, expected: str | None) -> bool:
    """Whether the cached file at ``path`` matches ``expected`` (always, without one): hashed at this process's
    first use of it, and deleted, so that it is downloaded again, when it does not match."""
    if expected is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        status = os.fstat(fd)
        with _checked_lock:
            if (path, status.st_dev, status.st_ino, status.st_size) in _checked:
                return True
        if status.st_size == 0:
            actual = digest(b"")
        else:
            with mmap.mmap(fd, status.st_size, access=mmap.ACCESS_READ) as mapped:
                actual = digest(mapped)
    finally:
        os.close(fd)
    if actual == expected.lower():
        checked_here(path, status)
        return True
    log.warning("[key=%s] the cached copy %s no longer matches its digest (damaged on disk, or by a power loss "
                "before it was written back): downloading it again", key, path)
    try:
        os.unlink(path)  # a reader that has it mapped keeps its pages; nobody else gets this file again
    except FileNotFoundError:
        pass
    return False
