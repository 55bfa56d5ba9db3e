"""Eviction orders for ShardCache: which cached files go first when space is needed."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One complete file in a cache directory.

    Attributes:
        key: The store key it holds.
        size: Its size in bytes.
        last_used: When it was last fetched (seconds since the epoch).
        owned: Whether it belongs to this cache's store (a cache directory
            may be shared by caches of several stores).
    """

    key: str
    size: int
    last_used: float
    owned: bool = True


class EvictionPolicy(Protocol):
    """Orders cached files for eviction; the cache evicts from the front and skips pinned files."""

    def order(self, entries: Sequence[CacheEntry]) -> list[CacheEntry]:
        """``entries`` in eviction order, the first to go first."""
        ...


class LeastRecentlyUsed:
    """Evict the file fetched longest ago first."""

    def order(self, entries: Sequence[CacheEntry]) -> list[CacheEntry]:
        """Oldest ``last_used`` first."""
        return sorted(entries, key=lambda e: e.last_used)


class FurthestInFuture:
    """Evict the file needed furthest in the future first (Belady's rule).

    The reader tells it what it will read next with :meth:`set_upcoming`;
    files not upcoming at all go first, least recently used first. Thread-safe.
    """

    def __init__(self, upcoming: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._next_use: dict[str, int] = {}
        self.set_upcoming(upcoming)

    def set_upcoming(self, keys: Iterable[str]) -> None:
        """Replace the known future: ``keys`` in the order they will be read."""
        next_use: dict[str, int] = {}
        for position, key in enumerate(keys):
            next_use.setdefault(key, position)
        with self._lock:
            self._next_use = next_use

    def order(self, entries: Sequence[CacheEntry]) -> list[CacheEntry]:
        """Files never needed again first (oldest first), then the furthest next use first."""
        with self._lock:
            next_use = self._next_use
        never = [e for e in entries if not e.owned or e.key not in next_use]
        later = [e for e in entries if e.owned and e.key in next_use]
        never.sort(key=lambda e: e.last_used)
        later.sort(key=lambda e: next_use[e.key], reverse=True)
        return never + later
