"""The checkpoint's background threads, at a lower CPU priority than the training loop's."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

BACKGROUND_NICE = 10
"""How much lower than the training loop's the background threads' CPU priority is (Linux)."""


def _lower_priority() -> None:
    """Let the training loop's threads win the CPU from this background thread (Linux: per-thread nice)."""
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + BACKGROUND_NICE))
    except (AttributeError, OSError):  # not Linux, or not allowed: run at the normal priority
        pass


def background_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads named ``trainio-ckpt-<name>``, each at the lower priority."""
    return ThreadPoolExecutor(threads, thread_name_prefix=f"trainio-ckpt-{name}", initializer=_lower_priority)
