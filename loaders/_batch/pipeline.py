"""The Loader's pipeline for one epoch: a feeder thread cutting the plan into groups of batches, threads assembling
them into staging slots, and the hand-over of each group's batches (copied to the device where there is one)."""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .assemble import Columns, Group, assemble_group, shards_in
from .device import DeviceCopy, cut, is_cuda, to_device
from .list_layout import Lists
from .row_numbers import Book
from .row_tables import ShardRows
from .staging import Staging, StagingRing

if TYPE_CHECKING:
    from .._order.epoch_plan import EpochPlan

_KEPT_TABLES = 64  # as many as a Dataset keeps mapped
DONE = object()
"""Put in :attr:`EpochPipeline.ready` after the last group."""


@dataclass(frozen=True)
class BatchSettings:
    """How a Loader makes batches (see :class:`~trainio.loaders.Loader`)."""

    batch_size: int
    group_batches: int
    prefetch: int
    threads: int
    lists: Lists
    pad_to: int | None
    pad_value: int
    drop_last: bool
    collate: Callable[[list[dict[str, Any]]], Any] | None
    torch: Any
    device: Any


class KeptTables:
    """Local shards' row tables, kept from epoch to epoch (the shards stay mapped anyway); thread-safe."""

    def __init__(self) -> None:
        self._tables: OrderedDict[int, ShardRows] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, shard: int) -> ShardRows | None:
        """Shard ``shard``'s table, if kept."""
        with self._lock:
            table = self._tables.get(shard)
            if table is not None:
                self._tables.move_to_end(shard)
            return table

    def keep(self, shard: int, table: ShardRows) -> None:
        """Keep ``table`` (the least recently used beyond the limit are dropped)."""
        with self._lock:
            self._tables[shard] = table
            while len(self._tables) > _KEPT_TABLES:
                self._tables.popitem(last=False)


class EpochPipeline:
    """One epoch of a Loader: the feeder thread, the assembling threads, and what they hand to the consumer.

    :attr:`ready` yields, in order, futures of assembled groups (each a list
    of batches, their sample and byte counts, and its copy to the device),
    then :data:`DONE`. :meth:`stop` ends every thread and releases the reader.
    """

    def __init__(self, plan: EpochPlan, settings: BatchSettings, ring: StagingRing, tables: KeptTables) -> None:
        self.plan = plan
        self.settings = settings
        self.tables = tables
        # A thread that finishes a group finds the next one already planned (up to one waiting per thread);
        # it takes a staging slot only when it starts, the one freed last and likeliest to be in the CPU's
        # cache. On the 2-core test VM each thread had waited 6-15 ms of a 150 ms epoch for its next group,
        # and now waits 1-5 ms (+1-3% on tokens in order in separate runs, +4-7% alternating in one process).
        ahead = _groups_ahead(settings)
        self.ready: queue.Queue[Any] = queue.Queue(maxsize=ahead)
        self.ring = ring
        self.ring.reserve(ahead + 2)
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self.reader = plan.open_reader()
        if settings.collate is None:  # rows are checked as they are copied (assemble.py)
            self.reader.leave_rows_to_readers()
        pool = None
        try:
            cuda = is_cuda(settings.torch, settings.device)
            self.stream = settings.torch.cuda.Stream(device=settings.device) if cuda else None
            self.pool = pool = _started_pool(settings.threads)
            self.thread = threading.Thread(target=self._feed, name="trainio-loader-feed", daemon=True)
            self.thread.start()
        except BaseException:  # nothing of a run that could not start is left open
            if pool is not None:
                pool.shutdown(wait=True)
            self.reader.close()
            raise

    def cache_counts(self) -> tuple[int, int, int]:
        """The reader's cache hits, misses and bytes downloaded so far."""
        stats = self.reader.cache_stats()
        return stats.get("hits", 0), stats.get("misses", 0), stats.get("downloaded_bytes", 0)

    def stop(self) -> None:
        """End every thread (the groups not yet taken are dropped) and close the reader."""
        self.stopping.set()
        while self.thread.is_alive():
            try:
                self.ready.get(timeout=0.05)
            except queue.Empty:
                pass
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()

    # -- the feeder thread ------------------------------------------------------------------

    def _feed(self) -> None:
        settings = self.settings
        group_rows = settings.group_batches * settings.batch_size
        book: Book | None = None
        empty = np.zeros(0, dtype=np.int64)
        shards, rows = empty, empty
        try:
            for chunk_shards, chunk_rows in self.plan.chunks(self.reader):
                if shards.size:
                    chunk_shards = np.concatenate((shards, chunk_shards))
                    chunk_rows = np.concatenate((rows, chunk_rows))
                shards, rows = chunk_shards, chunk_rows
                book = self._book(shards_in(shards), book)
                ids = book.ids(shards, rows)
                start = 0
                while ids.size - start >= group_rows:
                    if not self._submit(ids[start:start + group_rows], book):
                        return
                    start += group_rows
                shards, rows = shards[start:], rows[start:]
            if settings.drop_last:
                keep = shards.size - shards.size % settings.batch_size
                shards, rows = shards[:keep], rows[:keep]
            if shards.size:
                book = self._book(shards_in(shards), book)
                self._submit(book.ids(shards, rows), book)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            self.failure = exc
        finally:
            self._put(DONE)

    def _book(self, shards: list[int], book: Book | None) -> Book:
        """A book of at least ``shards``: ``book`` itself while it has them all and not many more."""
        if book is not None and book.covers(shards) and len(book.tables) <= 2 * len(shards):
            return book
        known = book.tables if book is not None else {}
        made = Book({shard: known.get(shard) or self._table(shard) for shard in shards})
        if not made.row_checked:  # rows laid out differently across shards are gathered without their digests
            for shard, table in made.tables.items():
                if table.row_checked:
                    self.reader.check_whole(shard)
        return made

    def _table(self, shard: int) -> ShardRows:
        """Shard ``shard``'s rows: those of an earlier epoch for a local shard, which stays mapped anyway."""
        table = self.tables.get(shard)
        if table is not None:
            return table
        dataset, info = self.plan.shard(shard)
        numbers = range(len(info.batches))
        digests = self.reader.row_digests(shard) if self.settings.collate is None else None
        if digests is None:
            table = ShardRows([self.reader.batch(shard, n) for n in numbers], source=(dataset.url, info.path))
        else:  # each row is checked against its digest as it is copied (assemble.py)
            table = ShardRows([self.reader.unchecked_batch(shard, n) for n in numbers],
                              source=(dataset.url, info.path), digests=digests)
            if not table.row_checked:  # a field not gathered by rows: the shard is checked whole instead
                self.reader.check_whole(shard)
        if dataset.is_local:
            self.tables.keep(shard, table)
        return table

    def _submit(self, ids: np.ndarray, book: Book) -> bool:
        size = self.settings.batch_size
        sizes = (size,) * (ids.size // size) + ((ids.size % size,) if ids.size % size else ())
        return self._put(self.pool.submit(self._assemble, Group(ids, sizes, book)))

    def _put(self, item: Any) -> bool:
        while not self.stopping.is_set():
            try:
                self.ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        if isinstance(item, Future):
            item.cancel()
        return False

    # -- the assembling threads -------------------------------------------------------------

    def _assemble(self, group: Group) -> Assembled:
        settings = self.settings
        if settings.collate is not None:
            return ([settings.collate(group.book.samples(group.ids[begin:end])) for begin, end in group.spans()],
                    group.sizes, (0,) * len(group.sizes), None)
        slot = self.ring.take()  # here, not when planned: the slot freed last, likeliest to be in cache
        columns, nbytes = assemble_group(group, slot, lists=settings.lists, pad_to=settings.pad_to,
                                         pad_value=settings.pad_value)
        return self._hand_over(columns, group, nbytes, slot)

    def _hand_over(self, columns: Columns, group: Group, nbytes: list[int], slot: Staging) -> Assembled:
        """The batches as the consumer gets them, their sample and byte counts, and their copy to the device.

        A column that holds the whole group is converted (and copied to the
        device) once, then cut into the batches' views. ``slot`` goes back to
        the ring once it is safe to reuse.
        """
        torch = self.settings.torch
        sizes = group.sizes
        copy = None
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                device = self.settings.device
                moved = [to_device(torch, value, device) for value in columns.values()]
                event = torch.cuda.Event()
                event.record(self.stream)
            self.ring.free_after(event, slot)
            copy = DeviceCopy(event, [t for v in moved for t in (v if isinstance(v, list) else [v])
                                      if isinstance(t, torch.Tensor)])
            parts = [cut(torch, value, sizes) for value in moved]
        else:
            self.ring.free_when_released(slot)
            parts = [cut(torch, value, sizes) for value in columns.values()]
        names = list(columns)
        return [dict(zip(names, values)) for values in zip(*parts)], sizes, nbytes, copy


Assembled = tuple[list[Any], tuple[int, ...], "list[int] | tuple[int, ...]", DeviceCopy | None]
"""An assembled group: its batches, their sample counts, their byte counts, and its copy to the device (or None)."""


def _started_pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads, all already running (one started mid-epoch would wait for a core the copies
    hold, and the batches with it)."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="trainio-loader")
    started = threading.Barrier(threads + 1)
    try:
        for _ in range(threads):
            pool.submit(started.wait)
        started.wait()
    except BaseException:  # a thread that cannot start: release those waiting, leave none behind
        started.abort()
        pool.shutdown(wait=True)
        raise
    return pool


def _groups_ahead(settings: BatchSettings) -> int:
    """Groups the pipeline keeps ready ahead of the consumer."""
    return max(settings.threads, -(-settings.prefetch // settings.group_batches)) + settings.threads


def read_ahead(settings: BatchSettings) -> int:
    """Groups of batches the pipeline may have read ahead of the consumer: ready, staged or being built."""
    return _groups_ahead(settings) + 2 + settings.threads
