"""Starting a file's write-back early, off the writer's thread: a later fsync then finds little left to write."""

from __future__ import annotations

import ctypes
import os
import queue
import threading

from ._libc import libc_function

_SYNC_FILE_RANGE_WRITE = 2


_sync_file_range = libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_pending: queue.Queue[int] | None = None  # duplicated descriptors whose write-back is to be started
_lock = threading.Lock()


def start_writeback(fd: int) -> None:
    """Have the kernel start writing ``fd``'s dirty pages to the device soon, and return at once (Linux;
    elsewhere nothing).

    A background thread asks the kernel (``sync_file_range``), on a
    duplicate of ``fd``: the call itself can block while the device's queue
    is full, which would stall the writer. The caller may close ``fd`` at
    once. It makes nothing durable and reports no error: a later fsync does
    both, and finds less left to write.
    """
    if _sync_file_range is None:
        return
    _queue().put(os.dup(fd))


def wait_for_writeback_starts() -> None:
    """Return once every write-back asked for so far has been started (tests)."""
    if _pending is not None:
        _pending.join()


def _queue() -> queue.Queue[int]:
    global _pending
    with _lock:
        if _pending is None:
            _pending = queue.Queue()
            threading.Thread(target=_start_each, args=(_pending,), name="trainio-writeback", daemon=True).start()
        return _pending


def _start_each(pending: queue.Queue[int]) -> None:
    while True:
        fd = pending.get()
        try:
            _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
        finally:
            os.close(fd)
            pending.task_done()


def _after_fork() -> None:
    global _pending, _lock
    _pending, _lock = None, threading.Lock()  # the parent's thread does not exist here


os.register_at_fork(after_in_child=_after_fork)
