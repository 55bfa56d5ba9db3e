"""ShardCache: remote files on local disk, within a byte budget, shared safely by processes."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ._atomic import fsync_dir, make_dirs, temp_name
from ._cache_reuse import checked_here, still_good
from ._eviction import CacheEntry, EvictionPolicy, LeastRecentlyUsed
from ._hashing import check_digest, digest
from ._keys import check_key
from ._s3 import S3Store
from ._store import Store
from .errors import StoreError

log = logging.getLogger("trainio.storage.cache")

_UNVERIFIED = "unverified"
_PIN_RETRIES = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheOptions:
    """How a ShardCache behaves.

    Attributes:
        durable: fsync each downloaded file before it becomes visible, so a
            power loss cannot damage it (default False: a process checks
            every cached file against its digest before its first use, so a
            file damaged by a power loss, or on disk since, is found and
            downloaded again instead).
        full_wait_s: How long a fetch waits for pinned files to be released
            when the cache is full of them, before it fails (default 10 s).
        lock_stripes: Number of lock files that serialise downloads of the
            same key across threads and processes (default 256).
    """

    durable: bool = False
    full_wait_s: float = 10.0
    lock_stripes: int = 256

    def __post_init__(self) -> None:
        if self.full_wait_s < 0:
            raise ValueError(f"CacheOptions.full_wait_s={self.full_wait_s}: must be >= 0")
        if self.lock_stripes < 1:
            raise ValueError(f"CacheOptions.lock_stripes={self.lock_stripes}: must be >= 1")


class ShardCache:
    """A local directory caching files of one store, never holding more than ``max_bytes``.

    Promises:

    - ``fetch`` downloads a key at most once however many threads and
      processes ask for it at the same time; the file appears complete and,
      when ``expected_xxh3`` is given, verified, or not at all.
    - A file fetched with ``expected_xxh3`` is checked against it before this
      process first uses it, whoever downloaded it and whenever: a file that
      no longer matches (damaged on disk, or by a power loss before it was
      written back) is deleted and downloaded again.
    - Bytes of finished files plus downloads in flight never exceed
      ``max_bytes``; space is made by evicting files in the ``policy``'s order
      (least recently used by default), skipping pinned ones.
    - A file is pinned while a :meth:`pinned` block holds it, in any process
      sharing the directory; it is never evicted then.
    - Contents survive restarts. Locks are ``flock`` locks, released by the
      kernel when a process dies, so a killed process leaves nothing that
      blocks the next one; its half-downloaded file is removed.

    Layout of ``cache_dir``: ``objects/<store id>/<key>@<digest>`` for cached
    files (``@unverified`` when fetched without a digest), ``tmp/`` for
    downloads in flight, ``locks/`` and ``.lock`` for the locks.
    """

    def __init__(
        self,
        store: Store,
        cache_dir: str | os.PathLike[str],
        max_bytes: int,
        *,
        policy: EvictionPolicy | None = None,
        options: CacheOptions = CacheOptions(),
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"ShardCache max_bytes={max_bytes}: must be > 0")
        self._store = store
        self._root = os.path.abspath(os.fspath(cache_dir))
        self._max_bytes = max_bytes
        self._policy: EvictionPolicy = policy or LeastRecentlyUsed()
        self._options = options
        self._objects = os.path.join(self._root, "objects")
        self._store_dir = os.path.join(self._objects, _store_id(store))
        self._tmp = os.path.join(self._root, "tmp")
        self._locks = os.path.join(self._root, "locks")
        for directory in (self._store_dir, self._tmp, self._locks):
            make_dirs(directory, durable=False)
        self._stats_lock = threading.Lock()
        self._stats = {"hits": 0, "misses": 0, "downloaded_bytes": 0, "evictions": 0}

    @property
    def store(self) -> Store:
        """The store whose files this cache holds."""
        return self._store

    @property
    def max_bytes(self) -> int:
        """The byte budget of the cache directory."""
        return self._max_bytes

    def stats(self) -> dict[str, int]:
        """This instance's counts: hits, misses, downloaded_bytes, evictions."""
        with self._stats_lock:
            return dict(self._stats)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._stats_lock:
            self._stats[name] += amount

    # -- public operations -------------------------------------------------------

    def path_for(self, key: str, *, expected_xxh3: str | None = None) -> Path:
        """Where ``key`` is (or would be) cached; the file may not exist."""
        return Path(self._content_path(check_key(self._store.url, key), expected_xxh3))

    def fetch(self, key: str, *, expected_xxh3: str | None = None, size: int | None = None) -> Path:
        """The local path of ``key``, downloading it first if it is not cached.

        ``size``, the key's size where the caller knows it (an index records
        it), spares asking the store; it is used only with ``expected_xxh3``,
        which then also checks it.

        The file may be evicted by a later fetch (of this or another process)
        unless it is pinned: read it inside :meth:`pinned` instead.

        Raises:
            NotFound: the key does not exist in the store.
            IntegrityError: the downloaded bytes do not match ``expected_xxh3``.
            StoreError: the file cannot fit: larger than ``max_bytes``, or
                the cache stayed full of pinned files for ``full_wait_s``.
        """
        key = check_key(self._store.url, key)
        path = self._content_path(key, expected_xxh3)
        if _touch(path) and still_good(key, path, expected_xxh3):
            self._count("hits")
            return Path(path)
        with self._flock(self._stripe_path(key), fcntl.LOCK_EX):
            if _touch(path) and still_good(key, path, expected_xxh3):
                self._count("hits")
                return Path(path)
            self._count("misses")
            self._download(key, expected_xxh3, path, size if expected_xxh3 is not None else None)
        return Path(path)

    @contextmanager
    def pinned(self, key: str, *, expected_xxh3: str | None = None, size: int | None = None) -> Iterator[Path]:
        """Fetch ``key`` (as :meth:`fetch` does) and keep it from eviction, in every process, until the block ends."""
        for _ in range(_PIN_RETRIES):
            path = self.fetch(key, expected_xxh3=expected_xxh3, size=size)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # evicted between fetch and open
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if os.fstat(fd).st_nlink == 0:
                    continue  # evicted while we waited for the lock
                yield path
                return
            finally:
                os.close(fd)
        raise StoreError(self._store.url, key, f"could not pin the cached file in {self._root}",
                         "the cache is thrashing: raise max_bytes")

    def contains(self, key: str, *, expected_xxh3: str | None = None) -> bool:
        """Whether ``key`` is cached now (it may be evicted at any moment unless pinned)."""
        return os.path.isfile(self._content_path(check_key(self._store.url, key), expected_xxh3))

    def used_bytes(self) -> int:
        """Bytes held by cached files and downloads in flight, across every process."""
        with self._flock(self._global_lock_path(), fcntl.LOCK_EX):
            self._remove_dead_downloads()
            entries, in_flight = self._scan()
        return sum(e.size for e, _ in entries) + in_flight

    def clear(self) -> int:
        """Evict every file not pinned; return how many were evicted."""
        evicted = 0
        with self._flock(self._global_lock_path(), fcntl.LOCK_EX):
            self._remove_dead_downloads()
            for _, path in self._scan()[0]:
                evicted += self._try_evict(path)
        return evicted

    # -- download and space ------------------------------------------------------

    def _download(self, key: str, expected: str | None, path: str, size: int | None) -> None:
        if size is None:
            size = self._store.size(key)
        if size > self._max_bytes:
            raise StoreError(self._store.url, key, f"is {size} bytes, more than the cache's whole budget "
                             f"of {self._max_bytes} bytes at {self._root}", "raise the cache's max_bytes")
        tmp_fd, tmp_path = self._reserve(key, size)
        try:
            actual = self._fill(key, tmp_fd, size)
            if expected is not None:
                check_digest(self._store.url, key, expected, actual)
            if self._options.durable:
                os.fsync(tmp_fd)
            make_dirs(os.path.dirname(path), durable=False)
            with self._flock(self._global_lock_path(), fcntl.LOCK_EX):
                os.replace(tmp_path, path)
            if self._options.durable:
                fsync_dir(os.path.dirname(path))
            checked_here(path, os.fstat(tmp_fd))
            self._count("downloaded_bytes", size)
        finally:
            os.close(tmp_fd)
            try:
                os.unlink(tmp_path)
            except FileNotFoundError:
                pass

    def _fill(self, key: str, fd: int, size: int) -> str:
        """Download ``key``'s first ``size`` bytes into the empty file ``fd``; their xxh3-128."""
        if size == 0:
            return digest(b"")
        # Written, never mapped: a write fault on a mapped hole zeroes the page before the copy into it.
        with open(fd, "wb", buffering=0, closefd=False) as file:
            return self._store.read_to(key, file, size=size)

    def _reserve(self, key: str, size: int) -> tuple[int, str]:
        """Make room for ``size`` bytes and return a locked temp file of that size holding the room."""
        deadline = time.monotonic() + self._options.full_wait_s
        while True:
            with self._flock(self._global_lock_path(), fcntl.LOCK_EX):
                self._remove_dead_downloads()
                entries, in_flight = self._scan()
                used = sum(e.size for e, _ in entries) + in_flight
                if used + size > self._max_bytes:
                    by_entry = {id(e): p for e, p in entries}
                    for entry in self._policy.order([e for e, _ in entries]):
                        if used + size <= self._max_bytes:
                            break
                        if self._try_evict(by_entry[id(entry)]):
                            used -= entry.size
                if used + size <= self._max_bytes:
                    return self._new_download(size)
            if time.monotonic() >= deadline:
                raise StoreError(
                    self._store.url, key,
                    f"cannot cache {size} bytes: {used} of {self._max_bytes} bytes at {self._root} "
                    f"are pinned or downloading",
                    "raise the cache's max_bytes or read fewer files at once",
                )
            time.sleep(0.05)

    def _new_download(self, size: int) -> tuple[int, str]:
        # Created and locked under the global lock, so no cleaner can take it for a dead one.
        tmp_path = os.path.join(self._tmp, temp_name())
        fd = os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(tmp_path)
            raise
        return fd, tmp_path

    def _try_evict(self, path: str) -> bool:
        """Delete the cached file at ``path`` unless a reader pins it."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            os.unlink(path)
            self._count("evictions")
            log.debug("[key=%s] evicted from %s", path, self._root)
            return True
        finally:
            os.close(fd)

    def _remove_dead_downloads(self) -> None:
        for name in os.listdir(self._tmp):
            path = os.path.join(self._tmp, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live download
            else:
                os.unlink(path)
                log.info("removed the half download %s left by a dead process", path)
            finally:
                os.close(fd)

    def _scan(self) -> tuple[list[tuple[CacheEntry, str]], int]:
        """Every cached file with its path, and the bytes reserved by downloads in flight."""
        entries: list[tuple[CacheEntry, str]] = []
        for directory, _, files in os.walk(self._objects):
            owned = directory == self._store_dir or directory.startswith(self._store_dir + os.sep)
            for name in files:
                path = os.path.join(directory, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                rel = os.path.relpath(path, self._store_dir if owned else self._objects)
                key = rel.rpartition("@")[0].replace(os.sep, "/")
                entries.append((CacheEntry(key, st.st_size, st.st_mtime, owned), path))
        in_flight = 0
        for name in os.listdir(self._tmp):
            try:
                in_flight += os.stat(os.path.join(self._tmp, name)).st_size
            except FileNotFoundError:
                continue
        return entries, in_flight

    # -- paths and locks ---------------------------------------------------------

    def _content_path(self, key: str, expected: str | None) -> str:
        tag = expected.lower() if expected is not None else _UNVERIFIED
        return os.path.join(self._store_dir, f"{key}@{tag}")

    def _stripe_path(self, key: str) -> str:
        stripe = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big")
        return os.path.join(self._locks, f"{stripe % self._options.lock_stripes:04d}.lock")

    def _global_lock_path(self) -> str:
        return os.path.join(self._root, ".lock")

    @contextmanager
    def _flock(self, path: str, operation: int) -> Iterator[None]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)


def _store_id(store: Store) -> str:
    """A short, stable name for the place a store's keys live (the same for equal URLs and endpoints)."""
    where = store.url
    if isinstance(store, S3Store):
        where += f"|{store.options.endpoint_url or ''}"
    return hashlib.sha256(where.encode()).hexdigest()[:16]


def _touch(path: str) -> bool:
    """Mark ``path`` as just used; False if it does not exist."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True
