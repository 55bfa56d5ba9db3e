"""Recent: the last few values made from the same input, kept for the next caller (thread-safe)."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """A map of at most ``limit`` entries that forgets the oldest first; for values that are never changed."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._values: dict[K, V] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value kept for ``key``, or None."""
        with self._lock:
            return self._values.get(key)

    def keep(self, key: K, value: V) -> V:
        """Keep ``value`` for ``key``; return it."""
        with self._lock:
            self._values[key] = value
            while len(self._values) > self._limit:
                del self._values[next(iter(self._values))]
        return value
