"""Record batches of a dataset's shards: memory-mapped in place, or through a local ShardCache, prefetched."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack

import pyarrow as pa

from trainio.storage import FurthestInFuture, ShardCache

from .._batch.row_tables import ShardRows
from . import shard_check
from .dataset import Dataset, map_file
from .row_check import RowDigestTable, check_batch_rows, read_row_digests
from .shard_check import DEFAULT_READ_AHEAD

log = logging.getLogger("trainio.loaders.reader")

_KEPT_DIGESTS = 64  # shards whose row digests stay read (8 bytes a row and field: 256 KB for 32,768 rows of one)


class ShardReader:
    """Reads record batches of one dataset, shard by shard, for a known upcoming order.

    Local datasets are memory-mapped where they are, and each shard is
    hashed against the index before any batch of it is returned (ahead of
    the reader, by a :class:`ShardChecker`, at most ``read_ahead`` bytes past
    the shards of the current plan); where the readers check rows
    (:meth:`leave_rows_to_readers`, before the first plan) and a shard has
    row digests, its rows are checked instead: by the caller as it copies
    them (:meth:`unchecked_batch`), or a batch's as :meth:`batch` returns
    it. Remote ones go through
    ``cache``, which checks each download: the shards of the current plan
    stay mapped and pinned, the next ``prefetch_shards`` shards of the plan
    download in the background, and the cache evicts the shard needed
    furthest in the future. At most ``open_shards`` shards stay mapped at
    once.
    """

    def __init__(self, dataset: Dataset, cache: ShardCache | None, policy: FurthestInFuture | None,
                 *, prefetch_shards: int, open_shards: int = 1024, read_ahead: int = DEFAULT_READ_AHEAD) -> None:
        if not dataset.is_local and cache is None:
            raise ValueError(f"{dataset.url}: a remote dataset needs a ShardCache")
        self._dataset = dataset
        self._cache = cache
        self._policy = policy
        self._prefetch = prefetch_shards
        self._open_limit = max(1, open_shards)
        self._open: OrderedDict[int, tuple[pa.Buffer, ExitStack]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, prefetch_shards), thread_name_prefix="trainio-prefetch") \
            if cache is not None and prefetch_shards else None
        self._downloads: dict[int, Future[object]] = {}
        self._upcoming: list[int] = []
        self._order: list[int] = []  # the epoch's shards in order of first use (expect)
        self._place: dict[int, int] = {}  # each one's place in that order
        self._checker = dataset.checker() if cache is None else None
        self._row_digests: OrderedDict[int, RowDigestTable] = OrderedDict()
        if self._checker is not None:
            self._checker.read_ahead = read_ahead

    def leave_rows_to_readers(self, read_ahead: bool = True) -> None:
        """This reader's caller checks each row of a local shard with row digests as it copies it (a Loader): such
        shards are not hashed whole, but read into memory ahead of it unless not ``read_ahead`` (the copies are
        made by worker processes, whose page faults the kernel reads ahead of). Call before the first
        :meth:`plan`."""
        if self._checker is not None:
            self._checker.leave_rows_to_readers(read_ahead)

    def plan(self, shards: Sequence[int], keep: Sequence[int] | None = None) -> None:
        """Tell the reader which shards it needs next, in order of first use, and which the cache should keep.

        Shards not in ``shards`` are unmapped and unpinned, so the cache may
        evict them; the listed ones are what the prefetch downloads ahead.
        ``keep`` (default ``shards``) is the future the cache evicts by: what
        every process sharing it reads next, in order of first use.
        """
        self._upcoming = list(dict.fromkeys(shards))
        if self._checker is not None:
            self._checker.plan(self._upcoming)
        if self._policy is not None:  # the shards prefetched past the plan are kept too, after it
            future = [*(self._upcoming if keep is None else keep), *self._beyond(self._upcoming)]
            self._policy.set_upcoming(self._dataset.shards[s].path for s in dict.fromkeys(future))
        mapped = set(self._upcoming)
        with self._lock:
            stale = [s for s in self._open if s not in mapped]
            released = [self._open.pop(s)[1] for s in stale]
        for stack in released:
            stack.close()

    def expect(self, shards: Sequence[int]) -> None:
        """The shards of the whole epoch, in order of first use: a local dataset's are checked that far ahead, a
        remote one's prefetched past the plan in that order."""
        self._order = list(dict.fromkeys(shards))
        self._place = {shard: place for place, shard in enumerate(self._order)}
        if self._checker is not None:
            self._checker.expect(shards)

    def batch(self, shard: int, number: int) -> pa.RecordBatch:
        """Record batch ``number`` of shard ``shard``, its rows checked: against the shard's row digests where the
        readers check rows (:meth:`leave_rows_to_readers`) and it has them, else by waiting until the whole shard
        has matched the index.

        Raises:
            IntegrityError: a row, the shard or its row digests file is not what the index records.
            FormatError: a size differs, or the batch does not decode.
        """
        digests = self.row_digests(shard)
        if digests is not None:
            batch = self.unchecked_batch(shard, number)
            first_row = self._dataset.shards[shard].batches[number].first_row
            if check_batch_rows((self._dataset.url, self._dataset.shards[shard].path), batch, first_row, digests):
                return batch
        mapped = self._checker.wait(shard).buffer if self._checker is not None else self._mapped(shard)
        where = self._dataset.shards[shard].batches[number]
        return self._dataset.decode_batch(shard, number, mapped.slice(where.offset, where.length))

    def batch_and_rows(self, shard: int, number: int) -> tuple[pa.RecordBatch, ShardRows | None]:
        """Record batch ``number`` of shard ``shard``, and, while its shard has not matched the index whole and has
        row digests of every field, its rows laid out by field: the caller checks each row it uses against those
        digests (which it has from elsewhere: a worker process, from its trainer) before using it. With None the
        batch is checked already, as :meth:`batch` checks it.

        Raises:
            IntegrityError, FormatError, NotFound, StoreError: as :meth:`batch`.
        """
        checker, info = self._checker, self._dataset.shards[shard]
        if checker is not None and info.row_xxh3 is not None and not checker.checked(shard):
            batch = self.unchecked_batch(shard, number)
            rows = ShardRows([batch], source=(self._dataset.url, info.path))
            if not rows.other and set(rows.fields) == set(info.row_xxh3.fields):
                return batch, rows
        return self.batch(shard, number), None

    def row_digests(self, shard: int) -> RowDigestTable | None:
        """The row digests of a local shard that has them (its file checked against the index), where the readers
        check rows (:meth:`leave_rows_to_readers`); None for a shard that is checked whole.

        Raises:
            IntegrityError, FormatError, NotFound, StoreError: the row digests file is damaged or missing.
        """
        if self._checker is None or not self._checker.rows_by_readers or not shard_check.CHECK_LOCAL_SHARDS \
                or self._dataset.shards[shard].row_xxh3 is None:
            return None
        return self._digest_table(shard)

    def _digest_table(self, shard: int) -> RowDigestTable:
        """The row digests of local shard ``shard`` (it has them), read once and kept among the last few."""
        with self._lock:
            found = self._row_digests.get(shard)
            if found is not None:
                self._row_digests.move_to_end(shard)
                return found
        found = read_row_digests(self._dataset.store, self._dataset.shards[shard])
        with self._lock:
            self._row_digests[shard] = found
            while len(self._row_digests) > _KEPT_DIGESTS:
                self._row_digests.popitem(last=False)
        return found

    def unchecked_batch(self, shard: int, number: int) -> pa.RecordBatch:
        """Record batch ``number`` of a local shard with row digests, not checked: for a caller that checks each
        row against :meth:`row_digests` before it uses it.

        Raises:
            FormatError: the batch does not decode, or holds another number of rows than the index says.
        """
        assert self._checker is not None, "only a local dataset's shards are read unchecked"
        mapped = self._checker.mapping(shard).buffer
        where = self._dataset.shards[shard].batches[number]
        return self._dataset.decode_batch(shard, number, mapped.slice(where.offset, where.length))

    def check_whole(self, shard: int) -> None:
        """Return once a local shard's bytes have matched the index whole (for rows that cannot be checked one by
        one); at once for a remote one, checked as it was fetched.

        Raises:
            IntegrityError, FormatError, NotFound, StoreError: as :meth:`batch`.
        """
        if self._checker is not None:
            self._checker.wait(shard)

    def _mapped(self, shard: int) -> pa.Buffer:
        with self._lock:
            entry = self._open.get(shard)
            if entry is not None:
                self._open.move_to_end(shard)
                return entry[0]
        self._start_prefetch(after=shard)
        pending = self._downloads.pop(shard, None)
        if pending is not None:
            try:
                pending.result()
            except Exception:  # noqa: BLE001 - fetched again below, which raises what persists
                log.debug("[shard=%d] its download failed; fetching it again", shard, exc_info=True)
        info = self._dataset.shards[shard]
        assert self._cache is not None
        stack = ExitStack()
        try:
            path = stack.enter_context(self._cache.pinned(info.path, expected_xxh3=info.xxh3_128, size=info.bytes))
            mapped = map_file(path)
        except BaseException:
            stack.close()
            raise
        with self._lock:
            self._open[shard] = (mapped, stack)
            while len(self._open) > self._open_limit:
                self._open.popitem(last=False)[1][1].close()
        return mapped

    def _beyond(self, shards: Sequence[int]) -> list[int]:
        """The ``prefetch_shards`` shards the epoch reads next after all of ``shards``."""
        last = max((self._place[s] for s in shards if s in self._place), default=-1)
        return [s for s in self._order[last + 1:last + 1 + self._prefetch] if s not in shards]

    def _start_prefetch(self, after: int) -> None:
        """Download the ``prefetch_shards`` shards read next after ``after``: the rest of the plan, then the epoch's
        next ones (a chunk's plan may hold only the shard being read, when shards are larger than two chunks)."""
        if self._pool is None:
            return
        rest = self._upcoming[self._upcoming.index(after) + 1:] if after in self._upcoming else []
        for shard in [*rest, *self._beyond([*self._upcoming, after])][:self._prefetch]:
            self._download(shard)

    def _download(self, shard: int) -> None:
        """Queue ``shard``'s fetch (a download, or the check of a cached copy), unless it is mapped or queued."""
        if self._pool is None or self._cache is None or shard in self._downloads or shard in self._open:
            return
        info = self._dataset.shards[shard]
        self._downloads[shard] = self._pool.submit(self._cache.fetch, info.path, expected_xxh3=info.xxh3_128,
                                                   size=info.bytes)

    def cache_stats(self) -> dict[str, int]:
        """The cache's hit and miss counts ({} for a local dataset)."""
        return self._cache.stats() if self._cache is not None else {}

    def close(self) -> None:
        """Unpin and unmap every shard and stop prefetching (the dataset's checker goes on with what it expects)."""
        if self._pool is not None:
            for future in self._downloads.values():
                future.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
        self._downloads.clear()
        with self._lock:
            entries, self._open = list(self._open.values()), OrderedDict()
        for _, stack in entries:
            stack.close()
