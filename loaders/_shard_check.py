"""ShardChecker: a local dataset's shards hashed against the index ahead of the reader, before any sample is used.

A local shard is memory-mapped in place, so unlike a downloaded one it is
never hashed on its way in. The checker hashes each shard the reader will
need, in one background thread, in the order the reader will need them,
through the same mapping the reader decodes from (so the hashing also brings
the pages in). :meth:`ShardChecker.wait` returns a shard's mapping only once
its bytes have matched the index's xxh3-128, and blocks only if the reader
gets there first. A shard checked once is not hashed again in this process
while its file stays the same (device, inode, size, modification time).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from trainio.storage import Hasher, IntegrityError

from ._dataset import Dataset, MappedFile

CHECK_LOCAL_SHARDS = True
"""For benchmarks only: False streams local shards unchecked, to measure what the check costs. Never in training."""

_PIECE = 32 << 20  # hashed per call: the GIL is released within one, and a closed checker stops between two

_verified: set[tuple[tuple[int, int, int, int], str]] = set()  # (file identity, xxh3-128) checked in this process
_verified_lock = threading.Lock()


def _after_fork() -> None:
    global _verified_lock
    _verified_lock = threading.Lock()  # a thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_after_fork)


def forget_verified() -> None:
    """Forget which shards this process has checked (benchmarks of a first epoch, tests)."""
    with _verified_lock:
        _verified.clear()


def _known_good(mapped: MappedFile, xxh3: str) -> bool:
    with _verified_lock:
        return (mapped.identity, xxh3) in _verified


class _Closed(Exception):
    """The checker was closed while it hashed a shard."""


class ShardChecker:
    """Checks the shards of one local dataset before the reader uses them, ahead of it, in a background thread.

    :meth:`plan` names the shards needed next (checked first, in that
    order), :meth:`expect` the rest of the epoch's (checked after them).
    Thread-safe; :meth:`close` stops the thread.
    """

    def __init__(self, dataset: Dataset) -> None:
        self._dataset = dataset
        self._cond = threading.Condition()
        self._planned: list[int] = []
        self._expected: list[int] = []
        self._next_expected = 0
        self._results: dict[int, tuple[tuple[int, int, int, int], BaseException | None]] = {}
        self._busy: int | None = None
        self._confirmed: set[int] = set()
        self._closed = False
        self._thread: threading.Thread | None = None

    def plan(self, shards: Sequence[int]) -> None:
        """Check these shards next, in this order (before those of :meth:`expect`)."""
        with self._cond:
            self._planned = [s for s in shards if s not in self._results]
            self._start()

    def expect(self, shards: Sequence[int]) -> None:
        """The shards of the whole epoch in order of first use: checked ahead once the planned ones are."""
        with self._cond:
            self._expected = list(dict.fromkeys(shards))
            self._next_expected = 0
            self._start()

    def wait(self, shard: int) -> MappedFile:
        """Shard ``shard``'s mapping, once its bytes match the index (blocking until they are checked).

        Raises:
            IntegrityError: the shard's xxh3-128 is not the index's.
            FormatError: its size is not the index's.
            NotFound, StoreError: it is missing, not a regular file, or a link out of the dataset.
        """
        mapped = self._dataset.mapped(shard, fresh=shard not in self._confirmed)
        self._confirmed.add(shard)  # the file is the one mapped: confirmed once per checker (epoch), not per batch
        if not CHECK_LOCAL_SHARDS or _known_good(mapped, self._dataset.shards[shard].xxh3_128):
            return mapped
        with self._cond:
            while True:
                result = self._results.get(shard)
                if result is not None and result[0] == mapped.identity:
                    if result[1] is not None:
                        raise result[1]
                    return mapped
                if result is not None:  # the file changed since it was checked: check it again
                    del self._results[shard]
                if self._closed:
                    raise RuntimeError(f"{self._dataset.url}: the shard checker is closed")
                if self._busy != shard and (not self._planned or self._planned[0] != shard):
                    self._planned.insert(0, shard)
                self._start()
                self._cond.wait()

    def close(self) -> None:
        """Stop checking (a shard being hashed is abandoned) and wait for the thread to end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    # -- the checking thread ---------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None and not self._closed and CHECK_LOCAL_SHARDS:
            self._thread = threading.Thread(target=self._run, name="trainio-shard-check", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _next(self) -> int | None:
        """The next shard to check (the lock held), or None when there is nothing to do."""
        while self._planned:
            shard = self._planned.pop(0)
            if shard not in self._results:
                return shard
        while self._next_expected < len(self._expected):
            shard = self._expected[self._next_expected]
            self._next_expected += 1
            if shard not in self._results:
                return shard
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                shard = self._next()
                while shard is None and not self._closed:
                    self._cond.wait()
                    shard = self._next()
                if self._closed:
                    return
                self._busy = shard
            assert shard is not None
            try:
                identity, error = self._check(shard)
            except _Closed:
                return
            with self._cond:
                self._results[shard] = (identity, error)
                self._busy = None
                self._cond.notify_all()

    def _check(self, shard: int) -> tuple[tuple[int, int, int, int], BaseException | None]:
        info = self._dataset.shards[shard]
        try:
            mapped = self._dataset.mapped(shard, fresh=True)
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits for this shard
            return (0, 0, 0, 0), exc
        if _known_good(mapped, info.xxh3_128):
            return mapped.identity, None
        hasher = Hasher()
        view = memoryview(mapped.buffer)
        for start in range(0, view.nbytes, _PIECE):
            if self._closed:
                raise _Closed
            hasher.update(view[start:start + _PIECE])
        actual = hasher.hexdigest()
        if actual != info.xxh3_128:
            return mapped.identity, IntegrityError(
                self._dataset.url, info.path, info.xxh3_128, actual,
                "the shard is damaged and none of its samples was delivered: run trainio verify, then restore "
                "or re-shard it")
        with _verified_lock:
            _verified.add((mapped.identity, info.xxh3_128))
        return mapped.identity, None
