"""ShardChecker: a local dataset's shards hashed against the index ahead of the reader, before any sample is used.

A local shard is memory-mapped in place, never hashed on its way in. The
checker hashes each shard the readers will need, in background threads from
the moment the epoch's order is known, in that order, through the mapping
they decode from (bringing the pages in). :meth:`ShardChecker.wait` returns
a shard's mapping only once its bytes have matched the index's xxh3-128 (a
reader that needs a shard nobody has started on hashes it itself). A shard
checked once is not hashed again while its file stays the same (device,
inode, size, modification time), in this process or those forked from the
same parent (``verified.py``).

A shard with row digests is checked row by row by readers that copy rows (a
Loader says so: :meth:`ShardChecker.leave_rows_to_readers`), and at most read
ahead here (``row_checked.py``); until a reader has said which it is, no thread
starts on such a dataset, and one that plans without saying has it hashed whole.

The threads read no further ahead than ``read_ahead`` bytes past the shards
the readers have planned: a shard beyond them is hashed up to that bound
and the hash resumes where it paused once the readers' plan moves on, so a
dataset larger than memory is never read far ahead of its readers (which
would evict what they need first), and a cold one streams in at most that
far ahead of them.
"""

from __future__ import annotations

import bisect
import itertools
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from trainio.storage import Hasher, IntegrityError

from . import verified
from .check_steps import Closed, LeftToReaders, PartialFetch, PartialHash, Paused
from .cold_hash import hash_by_reads, prefer_huge_pages, resident
from .row_checked import Look, look_at, read_for_readers

if TYPE_CHECKING:  # a Dataset makes its checker (Dataset.checker)
    from .dataset import Dataset, MappedFile

CHECK_LOCAL_SHARDS = True
"""For benchmarks only: False streams local shards unchecked, to measure what the check costs. Never in training."""

_PIECE = 1 << 30  # hashed per call: the GIL is released within one (taking it back between calls can wait a
#                   switch interval, 5 ms, behind busy threads), and a closed checker stops between two

DEFAULT_READ_AHEAD = 256 * 10**6
"""Bytes of shards read and checked ahead of the shards the readers have planned, unless told otherwise."""
_THREADS = min(2, os.cpu_count() or 1)  # background hashing threads per dataset (each hashes a shard at a time)

def forget_verified() -> None:
    """Forget which shards have been checked, here and in the processes sharing the record (benchmarks of a first
    epoch, tests)."""
    verified.forget()


_Identity = tuple[int, int, int, int]


class ShardChecker:
    """Checks the shards of one local dataset before they are used: ahead of the readers, and by whoever waits.

    One per :class:`Dataset` and process (:meth:`Dataset.checker`), shared by every reader of it. :meth:`expect`
    gives the order in which an epoch will need the shards, :meth:`plan` the ones needed next (checked first). Two
    background threads (one on a single core) hash them in that order while there are any left, and end when there
    are none (the sooner the first shards are checked, the less the readers wait); :meth:`wait` for a shard nobody
    hashes yet hashes it in the waiting thread. Of the shards past the furthest one planned, the threads read at
    most :attr:`read_ahead` bytes (:attr:`ahead_peak` says how many they did); a shard a reader waits for is hashed
    whole. Thread-safe.
    """

    def __init__(self, dataset: Dataset, read_ahead: int = DEFAULT_READ_AHEAD) -> None:
        self._dataset = dataset
        self._cond = threading.Condition()
        self._planned: list[int] = []
        self._expected: list[int] = []
        self._place: dict[int, int] = {}  # each expected shard's place in that order
        self._next_expected = 0
        self._ends: list[int] = []  # bytes of the expected shards up to and including each
        self._frontier = -1  # the place of the furthest shard the readers have planned (-1: none yet)
        self._read_ahead = read_ahead
        self._hashed: dict[int, int] = {}  # bytes hashed of each expected shard this epoch
        self._ahead_peak = 0
        self._paused: dict[int, PartialHash | PartialFetch] = {}  # shards whose hash stopped at the bound, nobody's now
        self._results: dict[int, tuple[_Identity | None, BaseException | None]] = {}  # None: whatever the file
        self._busy: set[int] = set()
        self._left: set[int] = set()  # shards with row digests found in memory this epoch: left to their readers
        self._looked: set[int] = set()  # shards with row digests looked at this epoch (row_checked.py)
        self._rows_by_readers: bool | None = None  # None: no reader has said yet (see leave_rows_to_readers)
        self._read_left_ahead = True  # shards left to the readers are still read into memory ahead of them
        self._has_row_digests = any(info.row_xxh3 is not None for info in dataset.shards)
        self._confirmed: set[int] = set()  # shards a reader asked for this epoch: file confirmed, in use, hashed whole
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._hashing = 0  # background threads on a shard now (the others are about to look for one)

    @property
    def read_ahead(self) -> int:
        """Bytes of shards past the furthest planned one that the threads may read and hash ahead of the readers."""
        return self._read_ahead

    @read_ahead.setter
    def read_ahead(self, nbytes: int) -> None:
        if nbytes < 0:
            raise ValueError(f"read_ahead={nbytes}: must be >= 0")
        with self._cond:
            self._read_ahead = nbytes
            self._start()

    @property
    def ahead_peak(self) -> int:
        """The most bytes this checker has read and hashed ahead of the readers at once: of shards past the furthest
        planned one that no reader had asked for yet."""
        return self._ahead_peak

    @property
    def rows_by_readers(self) -> bool:
        """Whether the readers check each row of a shard with row digests themselves (see the module's doc)."""
        return bool(self._rows_by_readers)

    def leave_rows_to_readers(self, read_ahead: bool = True) -> None:
        """Readers check each row of shards with row digests, read ahead if ``read_ahead``; before the first plan."""
        with self._cond:
            self._rows_by_readers, self._read_left_ahead = True, read_ahead
            self._start()

    def plan(self, shards: Sequence[int]) -> None:
        """Check these shards next, in this order (before the rest of :meth:`expect`'s)."""
        with self._cond:
            if self._rows_by_readers is None:
                self._rows_by_readers = False  # a reader that checks no row: every shard is hashed whole
            self._planned = [s for s in shards if s not in self._results and s not in self._left]
            self._frontier = max([self._frontier] + [self._place[s] for s in shards if s in self._place])
            self._start()

    def expect(self, shards: Sequence[int]) -> None:
        """A new epoch's shards in order of first use: checked ahead, after the planned ones.

        Each shard's file is confirmed again (by its identity) at its first
        use in the epoch, so a file replaced between epochs is checked again,
        and a shard that failed is tried again.
        """
        with self._cond:
            self._expected = list(dict.fromkeys(shards))
            self._place = {shard: place for place, shard in enumerate(self._expected)}
            self._next_expected = 0
            self._frontier = -1
            self._ends = list(itertools.accumulate(self._dataset.shards[s].bytes for s in self._expected))
            self._hashed = {}
            self._confirmed.clear()
            self._results = {k: v for k, v in self._results.items() if v[1] is None}  # failures are retried
            self._left.clear()
            self._looked.clear()
            self._start()

    def wait(self, shard: int) -> MappedFile:
        """Shard ``shard``'s mapping, once its bytes match the index (blocking until they are checked).

        Raises:
            IntegrityError: the shard's xxh3-128 is not the index's.
            FormatError: its size is not the index's.
            NotFound, StoreError: it is missing, not a regular file, or a link out of the dataset.
        """
        mapped = self.mapping(shard)
        if not CHECK_LOCAL_SHARDS or verified.known(mapped.identity, self._dataset.shards[shard].xxh3_128):
            return mapped
        while True:
            with self._cond:
                result = self._results.get(shard)
                if result is not None and result[0] not in (None, mapped.identity):
                    del self._results[shard]  # the file changed since it was checked: check it again
                    result = None
                if result is not None:
                    if result[1] is not None:
                        raise result[1]
                    return mapped
                if self._closed:
                    raise RuntimeError(f"{self._dataset.url}: the shard checker is closed")
                if shard in self._busy:  # being hashed: done sooner than anything this thread could start
                    self._cond.wait()
                    continue
                self._busy.add(shard)  # nobody is on it (not announced, or not reached yet): hash it here
            self._check_and_record(shard, waited=True)

    def checked(self, shard: int) -> bool:
        """Whether shard ``shard``'s file, as mapped now, has matched the index whole (here, or in a process
        sharing the record), or is not to be checked at all (the benchmarks' switch); never waits."""
        return not CHECK_LOCAL_SHARDS or verified.known(self.mapping(shard).identity, self._dataset.shards[shard].xxh3_128)

    def mapping(self, shard: int) -> MappedFile:
        """Shard ``shard``'s mapping, not checked here: for :meth:`wait`, and for readers that check each row they
        read against the shard's row digests. Its file is confirmed (by identity) once per epoch."""
        mapped = self._dataset.mapped(shard, fresh=(fresh := shard not in self._confirmed))
        self._confirmed.add(shard)  # the file is the one mapped: confirmed once per epoch, not per batch
        if fresh and self._rows_by_readers and self._read_left_ahead:  # a Loader's faults read in huge folios too
            prefer_huge_pages(mapped.buffer)  # (in its process: not a worker's, which reads no shard ahead)
        return mapped

    def close(self) -> None:
        """Stop checking (a shard being hashed is abandoned) and wait for the background thread to end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            threads = [t for t in self._threads if t is not threading.current_thread()]  # its dataset dropped in it
        for thread in threads:
            thread.join()

    # -- the checking ------------------------------------------------------------------------------

    def _start(self) -> None:
        """Start background threads, up to :data:`_THREADS`, while there is work for them (the lock held)."""
        if self._closed or not CHECK_LOCAL_SHARDS or (self._rows_by_readers is None and self._has_row_digests):
            return
        if self._rows_by_readers and self._has_row_digests:
            self._look_at_row_checked()
        self._threads = [t for t in self._threads if t.is_alive()]
        while len(self._threads) < _THREADS and self._has_work(len(self._threads) - self._hashing):
            thread = threading.Thread(target=self._run, name="trainio-shard-check", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._cond.notify_all()  # and threads paused at the bound look again

    def _look_at_row_checked(self) -> None:
        """Of the shards the threads would start next, those their readers check row by row and that need no thread,
        found good or left to the readers at once (the lock held; see ``row_checked.py``)."""
        for shard in dict.fromkeys(self._planned + self._expected[self._next_expected:self._horizon()]):
            if (self._dataset.shards[shard].row_xxh3 is None or shard in self._looked or shard in self._results
                    or shard in self._busy or shard in self._paused):
                continue
            self._looked.add(shard)
            found, identity = look_at(self._dataset, shard, read_ahead=self._read_left_ahead)
            if found is Look.GOOD:
                self._results[shard] = (identity, None)
            elif found is Look.LEFT:
                self._left.add(shard)

    def _has_work(self, beyond: int) -> bool:
        """Whether more than ``beyond`` shards (as many as threads are free) wait for a thread."""
        todo = dict.fromkeys(self._planned + self._resumable() + self._expected[self._next_expected:self._horizon()])
        return sum(s not in self._results and s not in self._busy and s not in self._left for s in todo) > beyond

    def _next(self) -> int | None:
        """The next shard to check, nobody's yet (the lock held); None when there is none."""
        while self._planned:
            shard = self._planned.pop(0)
            if shard not in self._results and shard not in self._busy and shard not in self._left:
                return shard
        resumable = self._resumable()
        if resumable:
            return resumable[0]
        while self._next_expected < self._horizon():
            shard = self._expected[self._next_expected]
            self._next_expected += 1
            if shard not in self._results and shard not in self._busy and shard not in self._left:
                return shard
        return None

    def _resumable(self) -> list[int]:
        """The paused shards the bound now lets go on, in the epoch's order (the lock held)."""
        ready = [s for s, partial in self._paused.items() if self._allowed(s) > partial.done]
        return sorted(ready, key=lambda s: self._place.get(s, -1))

    def _base(self) -> int:
        """Where, in bytes of the expected shards, the furthest planned one ends (the lock held)."""
        return self._ends[self._frontier] if self._frontier >= 0 else 0

    def _horizon(self) -> int:
        """How many of the expected shards may be started by now: those up to the furthest planned one, and those
        beginning less than :attr:`read_ahead` bytes past it (the lock held)."""
        limit = bisect.bisect_left(self._ends, self._base() + self._read_ahead) + 1 if self._read_ahead else 0
        return min(len(self._expected), max(self._frontier + 1, limit))

    def _allowed(self, shard: int) -> int:
        """How many bytes of ``shard`` may be hashed by now (the lock held): all of one planned, passed or waited
        for, or not expected; of one further ahead, what the read-ahead bound leaves."""
        size = self._dataset.shards[shard].bytes
        place = self._place.get(shard)
        if place is None or place <= self._frontier or shard in self._confirmed:
            return size
        start = self._ends[place - 1] if place else 0
        return max(0, min(size, self._read_ahead - (start - self._base())))

    def _allowance(self, shard: int, partial: PartialHash | PartialFetch) -> int:
        """The byte ``shard`` may be hashed up to now; at the bound, its hash is kept in :attr:`_paused` and the
        thread lets it go (:class:`Paused`), so no thread waits on a reader that may never come."""
        with self._cond:
            if self._closed:
                raise Closed
            allowed = self._allowed(shard)
            if allowed > partial.done:
                return allowed
            self._paused[shard] = partial
            raise Paused

    def _note_hashed(self, shard: int, done: int) -> None:
        """``done`` bytes of ``shard`` are hashed: how far the threads are ahead of the readers' plan."""
        with self._cond:
            self._hashed[shard] = done
            ahead = sum(n for s, n in self._hashed.items()
                        if self._place.get(s, -1) > self._frontier and s not in self._confirmed)
            self._ahead_peak = max(self._ahead_peak, ahead)

    def _run(self) -> None:
        while True:
            with self._cond:
                shard = None if self._closed else self._next()
                if shard is None:
                    return  # nothing left: ends; plan(), expect() or wait() start another when there is
                self._busy.add(shard)
                self._hashing += 1
            try:
                self._check_and_record(shard, waited=False)
            finally:
                with self._cond:
                    self._hashing -= 1

    def _check_and_record(self, shard: int, *, waited: bool) -> None:
        """Hash ``shard`` (claimed in ``_busy``) and record the outcome for its waiters (``waited``: for one now)."""
        try:
            identity, error = self._check(shard, waited)
        except (Closed, Paused, LeftToReaders) as stopped:
            with self._cond:
                self._busy.discard(shard)
                if isinstance(stopped, LeftToReaders):
                    self._left.add(shard)  # until the next epoch: its residency is not looked at again
                self._cond.notify_all()
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the waiters, not lost with this thread
            identity, error = None, exc
        with self._cond:
            self._results[shard] = (identity, error)
            self._busy.discard(shard)
            self._cond.notify_all()

    def _check(self, shard: int, waited: bool) -> tuple[_Identity | None, BaseException | None]:
        info = self._dataset.shards[shard]
        with self._cond:
            partial = self._paused.pop(shard, None)
        if isinstance(partial, PartialFetch) or (partial is None and not waited and self._rows_by_readers
                                                 and info.row_xxh3 is not None):
            return read_for_readers(self._dataset, shard, partial, read_ahead=self._read_left_ahead,
                                    allowance=lambda p: self._allowance(shard, p),
                                    note=lambda done: self._note_hashed(shard, done))
        if partial is None:
            try:
                # The mapping kept, if any, not re-confirmed here: wait() confirms the file once an epoch, and every
                # system call here gives up the GIL, which can take a switch interval (5 ms) to get back.
                mapped = self._dataset.mapped(shard)
            except Exception as exc:  # noqa: BLE001 - handed to whoever waits for this shard
                return None, exc
            if verified.found_good(mapped.identity, info.xxh3_128, lambda: self._closed):
                return mapped.identity, None
            partial = PartialHash(mapped, Hasher(), 0)
        mapped, hasher, view = partial.mapped, partial.hasher, memoryview(partial.mapped.buffer)
        fd: int | None = None  # the same file opened for reads, once a range of it is found not in memory
        replaced = False  # the file is no longer the one mapped: hashed from the mapping
        verified.claim(mapped.identity, info.xxh3_128)
        try:
            while partial.done < view.nbytes:  # paused where the read-ahead bound stops it, until readers move on
                end = min(self._allowance(shard, partial), partial.done + _PIECE)
                if fd is None and not replaced and not resident(mapped.buffer, partial.done, end):
                    fd = self._dataset.open_same(shard, mapped.identity)
                    replaced = fd is None
                if fd is not None:
                    if not hash_by_reads(fd, hasher, partial.done, end, lambda: self._closed):
                        raise Closed
                else:
                    hasher.update(view[partial.done:end])
                partial.done = end
                self._note_hashed(shard, end)
        finally:
            verified.release(mapped.identity, info.xxh3_128)
            if fd is not None:
                os.close(fd)
        actual = hasher.hexdigest()
        if actual != info.xxh3_128:
            return mapped.identity, IntegrityError(self._dataset.url, info.path, info.xxh3_128, actual, "the shard is "
                                                   "damaged and none of its samples was delivered: run trainio "
                                                   "verify, then restore or re-shard it")
        verified.remember(mapped.identity, info.xxh3_128)
        return mapped.identity, None
