"""Loader: batches assembled in-process into a ring of staging buffers, then handed to the trainer's device."""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from trainio.storage import TrainioError

from ._batch.assemble import Columns, Group, assemble_group, shards_in
from ._batch.list_layout import Lists, check_lists
from ._batch.row_numbers import Book
from ._batch.row_tables import ShardRows
from ._batch.staging import Staging, StagingRing
from ._streaming import StreamingDataset

_GROUP_BYTES = 16 << 20
_MAX_GROUP_BATCHES = 64
_KEPT_TABLES = 64  # as many as a Dataset keeps mapped
_DONE = object()


class LoaderError(TrainioError, RuntimeError):
    """The loader's background work failed; the original error is the ``__cause__``."""


class Loader:
    """Batches of a :class:`StreamingDataset`, assembled by background threads of this process.

    The epoch's order is cut into groups of consecutive batches (about 16 MB
    each). ``threads`` threads assemble groups side by side, each copying
    every sample's bytes once, out of the memory-mapped shards into a
    preallocated staging slot (pinned host memory when the device is CUDA),
    with one C-level gather per field that runs without the GIL; batches
    still arrive in order. At least ``prefetch`` batches are prepared ahead.
    On a CUDA device each group is then copied to the device with
    non-blocking copies on a dedicated stream, the consumer's stream waits on
    that copy's event, and a slot is reused only once its copy has finished.
    On the CPU the batch's tensors are views of the slot, which is reused
    only once every tensor of its batches has been released (garbage
    collected): keep batches as long as you like, at the cost of the loader
    allocating another slot. The slots are kept from epoch to epoch, so
    iterate one loader every epoch rather than making a new one.

    Batches are dicts of tensors (numpy arrays when torch is absent).
    Fixed-width fields (numbers, tensors) become ``(batch, ...)`` arrays.
    Lists of numbers, and binary fields as lists of uint8, are padded
    (``"pad"``: a ``(batch, width)`` array, ``width`` being ``pad_to`` or the
    batch's longest row, longer rows cut, filled with ``pad_value``, plus
    ``<name>_lengths``) or packed (``"pack"``: the values end to end plus
    ``<name>_offsets``, batch + 1 of them). ``lists="auto"`` (the default)
    packs binary fields (encoded images, audio: padding would copy every one
    at the batch's longest) and pads lists of numbers. Strings, nested types
    and fields with nulls come as Python lists. ``collate`` replaces
    assembly: it receives each batch's list of sample dicts.

    ``batch_size`` must be a multiple of the dataset's own ``batch_size``
    (its default, 1, divides every size), so every position the dataset
    saves is exact.

    Errors of the background work are raised in the consumer as
    :class:`LoaderError` with the original as cause; leaving the loop early
    stops every thread and releases every shard. :meth:`metrics` gives
    samples/s, bytes/s, the time the consumer waited and cache hits and misses.
    """

    def __init__(
        self,
        dataset: StreamingDataset,
        batch_size: int,
        *,
        device: Any = "cpu",
        prefetch: int = 4,
        threads: int = 2,
        lists: Lists = "auto",
        pad_to: int | None = None,
        pad_value: int = 0,
        drop_last: bool = False,
        collate: Callable[[list[dict[str, Any]]], Any] | None = None,
    ) -> None:
        if batch_size < 1 or prefetch < 1 or threads < 1:
            raise ValueError(f"batch_size={batch_size}, prefetch={prefetch}, threads={threads}: all must be >= 1")
        check_lists(lists, pad_to)
        dealt = dataset.layout().batch
        if batch_size % dealt:
            raise ValueError(f"Loader batch_size={batch_size} must be a multiple of the dataset's batch_size={dealt} "
                             "(the batches the epoch is dealt to ranks in); otherwise a step would end inside one "
                             f"and no saved position could be exact: build the StreamingDataset with "
                             f"batch_size={batch_size}, or pass a multiple of {dealt}")
        self._dataset = dataset
        self._batch_size = batch_size
        self._prefetch = prefetch
        self._threads = threads
        self._lists: Lists = lists
        self._pad_to, self._pad_value = pad_to, pad_value
        self._drop_last = drop_last
        self._collate = collate
        self._torch, self._device = _resolve_device(device)
        shards = [info for d in dataset.datasets for info in d.shards]
        row_bytes = max(1, sum(s.bytes for s in shards) // max(1, sum(s.rows for s in shards)))
        self._group_batches = max(1, min(_MAX_GROUP_BATCHES, _GROUP_BYTES // (row_bytes * batch_size)))
        self._ring: StagingRing | None = None
        self._tables: OrderedDict[int, ShardRows] = OrderedDict()  # local shards' tables, kept across epochs
        self._tables_lock = threading.Lock()
        self._metrics = {"samples": 0, "batches": 0, "bytes": 0, "wait_s": 0.0, "seconds": 0.0,
                         "cache_hits": 0, "cache_misses": 0}

    @property
    def dataset(self) -> StreamingDataset:
        """The dataset the batches come from (call its ``set_epoch`` between epochs)."""
        return self._dataset

    def __len__(self) -> int:
        """Batches the rest of the current epoch holds for this rank."""
        samples = len(self._dataset)
        return samples // self._batch_size if self._drop_last else -(-samples // self._batch_size)

    def metrics(self) -> dict[str, float]:
        """Counts of the last (or current) epoch: samples, batches, bytes, samples_per_s, bytes_per_s, wait_s, cache hits and misses."""
        m = dict(self._metrics)
        seconds = max(m["seconds"], 1e-9)
        m["samples_per_s"] = m["samples"] / seconds
        m["bytes_per_s"] = m["bytes"] / seconds
        return m

    def __iter__(self) -> Iterator[Any]:
        run = _Run(self)
        started = time.perf_counter()
        self._metrics.update(samples=0, batches=0, bytes=0, wait_s=0.0, seconds=0.0)
        metrics = self._metrics
        consumed = self._dataset.count_consumed
        try:
            while True:
                waited = time.perf_counter()
                item = run.ready.get()
                if item is _DONE:
                    metrics["wait_s"] += time.perf_counter() - waited
                    run.raise_failure()
                    return
                try:
                    batches, counts, nbytes, event = item.result()
                except BaseException as exc:
                    raise LoaderError(f"the loader's background work failed: {exc}") from exc
                metrics["wait_s"] += time.perf_counter() - waited
                for batch, count, size in zip(batches, counts, nbytes):
                    if event is not None:
                        _wait_on_device(self._torch, self._device, batch, event)
                    metrics["samples"] += count
                    metrics["batches"] += 1
                    metrics["bytes"] += size
                    metrics["seconds"] = time.perf_counter() - started
                    consumed(count)
                    yield batch
                del batches, item
        finally:
            run.stop()
            metrics["seconds"] = time.perf_counter() - started
            metrics["cache_hits"], metrics["cache_misses"] = run.cache_counts()


class _Run:
    """One epoch: the feeder thread cutting the order into groups, the assembling threads, and the staging slots."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        # A thread that finishes a group finds the next one already planned (up to one waiting per thread);
        # it takes a staging slot only when it starts, the one freed last and likeliest to be in the CPU's
        # cache. On the 2-core test VM each thread had waited 6-15 ms of a 150 ms epoch for its next group,
        # and now waits 1-5 ms (+1-3% on tokens in order in separate runs, +4-7% alternating in one process).
        ahead = max(loader._threads, -(-loader._prefetch // loader._group_batches)) + loader._threads
        self.ready: queue.Queue[Any] = queue.Queue(maxsize=ahead)
        if loader._ring is None:
            loader._ring = StagingRing(_allocator(loader))
        self.ring = loader._ring
        self.ring.reserve(ahead + 2)
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self.reader = loader._dataset.reader()
        pool = None
        try:
            self.stream = loader._torch.cuda.Stream(device=loader._device) if _is_cuda(loader) else None
            self.pool = pool = _started_pool(loader._threads)
            self.thread = threading.Thread(target=self._feed, name="trainio-loader-feed", daemon=True)
            self.thread.start()
        except BaseException:  # nothing of a run that could not start is left open
            if pool is not None:
                pool.shutdown(wait=True)
            self.reader.close()
            raise

    def cache_counts(self) -> tuple[int, int]:
        stats = self.reader.cache_stats()
        return stats.get("hits", 0), stats.get("misses", 0)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise LoaderError(f"the loader's background work failed: {self.failure}") from self.failure

    def stop(self) -> None:
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
        loader = self.loader
        dataset = loader._dataset
        group_rows = loader._group_batches * loader._batch_size
        book: Book | None = None
        empty = np.zeros(0, dtype=np.int64)
        shards, rows = empty, empty
        try:
            for chunk_shards, chunk_rows in dataset.shard_rows(dataset.layout(), self.reader):
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
            if loader._drop_last:
                keep = shards.size - shards.size % loader._batch_size
                shards, rows = shards[:keep], rows[:keep]
            if shards.size:
                book = self._book(shards_in(shards), book)
                self._submit(book.ids(shards, rows), book)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            self.failure = exc
        finally:
            self._put(_DONE)

    def _book(self, shards: list[int], book: Book | None) -> Book:
        """A book of at least ``shards``: ``book`` itself while it has them all and not many more."""
        if book is not None and book.covers(shards) and len(book.tables) <= 2 * len(shards):
            return book
        known = book.tables if book is not None else {}
        return Book({shard: known.get(shard) or self._table(shard) for shard in shards})

    def _table(self, shard: int) -> ShardRows:
        """Shard ``shard``'s rows: those of an earlier epoch for a local shard, which stays mapped anyway."""
        loader = self.loader
        with loader._tables_lock:
            table = loader._tables.get(shard)
            if table is not None:
                loader._tables.move_to_end(shard)
                return table
        dataset, info = loader._dataset.shard(shard)
        batches = [self.reader.batch(shard, number) for number in range(len(info.batches))]
        table = ShardRows(batches, source=(dataset.url, info.path))
        if dataset.is_local:
            with loader._tables_lock:
                loader._tables[shard] = table
                while len(loader._tables) > _KEPT_TABLES:
                    loader._tables.popitem(last=False)
        return table

    def _submit(self, ids: np.ndarray, book: Book) -> bool:
        size = self.loader._batch_size
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

    def _assemble(self, group: Group) -> _Assembled:
        loader = self.loader
        if loader._collate is not None:
            return ([loader._collate(group.book.samples(group.ids[begin:end])) for begin, end in group.spans()],
                    group.sizes, (0,) * len(group.sizes), None)
        slot = self.ring.take()  # here, not when planned: the slot freed last, likeliest to be in cache
        columns, nbytes = assemble_group(group, slot, lists=loader._lists, pad_to=loader._pad_to,
                                         pad_value=loader._pad_value)
        return self._hand_over(columns, group, nbytes, slot)

    def _hand_over(self, columns: Columns, group: Group, nbytes: list[int], slot: Staging) -> _Assembled:
        """The batches as the consumer gets them, their sample and byte counts, and the copy's event.

        A column that holds the whole group is converted (and copied to the
        device) once, then cut into the batches' views. ``slot`` goes back to
        the ring once it is safe to reuse.
        """
        torch = self.loader._torch
        sizes = group.sizes
        event = None
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                device = self.loader._device
                parts = [_cut(torch, _to_device(torch, value, device), sizes) for value in columns.values()]
                event = torch.cuda.Event()
                event.record(self.stream)
            self.ring.free_after(event, slot)
        else:
            self.ring.free_when_released(slot)
            parts = [_cut(torch, value, sizes) for value in columns.values()]
        names = list(columns)
        return [dict(zip(names, values)) for values in zip(*parts)], sizes, nbytes, event


_Assembled = tuple[list[Any], tuple[int, ...], "list[int] | tuple[int, ...]", Any]


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


def _to_device(torch: Any, value: np.ndarray | list[Any], device: Any) -> Any:
    """``value`` (a whole-group array, or a list of per-batch items), its arrays copied to ``device``, non-blocking."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value).to(device, non_blocking=True)
    return [torch.from_numpy(v).to(device, non_blocking=True) if isinstance(v, np.ndarray) else v for v in value]


def _cut(torch: Any, value: Any, sizes: tuple[int, ...]) -> list[Any] | tuple[Any, ...]:
    """One item per batch: a whole-group array cut along its first axis, or a list of per-batch items (arrays as
    tensors when torch is present)."""
    if isinstance(value, list):
        return [torch.from_numpy(v) if torch is not None and isinstance(v, np.ndarray) else v for v in value]
    if torch is None:
        bounds = np.cumsum(sizes)[:-1].tolist()
        return np.split(value, bounds)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    return value.split(sizes)  # type: ignore[no-any-return]


def _wait_on_device(torch: Any, device: Any, batch: dict[str, Any], event: Any) -> None:
    """Make the consumer's current stream wait for the batch's copy, and tell the allocator it uses the tensors."""
    stream = torch.cuda.current_stream(device)
    stream.wait_event(event)
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            value.record_stream(stream)


def _allocator(loader: Loader) -> Callable[[int], np.ndarray]:
    """How the loader's staging memory is made: pinned host memory for a CUDA device, plain memory otherwise."""
    torch = loader._torch
    if _is_cuda(loader):
        return lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    return lambda nbytes: np.empty(nbytes, dtype=np.uint8)


def _is_cuda(loader: Loader) -> bool:
    return loader._torch is not None and getattr(loader._device, "type", "cpu") == "cuda"


def _resolve_device(device: Any) -> tuple[Any, Any]:
    try:
        import torch
    except ImportError:
        if str(device) != "cpu":
            raise ValueError(f"device={device!r} needs torch, which is not installed") from None
        return None, "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine")
    return torch, resolved
