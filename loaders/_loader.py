"""Loader: batches assembled in-process into a ring of staging buffers, then handed to the trainer's device."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from trainio.storage import TrainioError

from ._batch.device import is_cuda, resolve_device, staging_allocator
from ._batch.list_layout import Lists, check_lists
from ._batch.pipeline import DONE, BatchSettings, EpochPipeline, KeptTables, read_ahead
from ._batch.staging import StagingRing
from ._batch.transform_pool import TransformPool, WorkerFailed
from ._batch.transform_worker import Transform
from ._sizes import parse_size
from ._streaming import StreamingDataset

_GROUP_BYTES = 16 << 20
_MAX_GROUP_BATCHES = 64


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

    Per-sample Python work (decoding, augmenting) runs in ``workers``
    processes instead: ``transform(sample) -> dict`` is applied to every
    sample there, with Python's, numpy's and torch's global generators
    seeded from (the dataset's seed, the epoch, the sample's position in the
    epoch), so a resumed epoch gives the same augmented samples. Each
    batch's fields must then be arrays (or tensors, or numbers) of one shape
    per field, stacked into a slot of shared memory (``slot_bytes`` each, a
    larger one made when a batch needs it) that the batch's tensors view, no
    pickling; byte strings are packed end to end (``<name>`` uint8 and
    ``<name>_offsets``, as this loader packs binary), strings and other
    values come as lists. Batches keep the epoch's
    order and the resume position; a worker that raises is named with the
    sample, one that dies with its exit code, one that sends no batch for
    ``timeout_s`` seconds (default: no limit) as stuck, and the workers
    (kept from epoch to epoch) are then stopped. ``workers`` without
    ``transform`` hands the samples over as they are. Workers start by fork
    where the platform has it (``start_method`` to choose); :meth:`close`
    stops them (so does the loader's collection).
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
        transform: Transform | None = None,
        workers: int = 0,
        slot_bytes: int | str = "64MB",
        start_method: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        if batch_size < 1 or prefetch < 1 or threads < 1:
            raise ValueError(f"batch_size={batch_size}, prefetch={prefetch}, threads={threads}: all must be >= 1")
        if workers < 0 or (transform is not None and workers < 1):
            raise ValueError(f"workers={workers}: a transform runs in worker processes, give workers >= 1")
        if workers and collate is not None:
            raise ValueError("collate and workers do not go together: the workers stack the batches themselves")
        check_lists(lists, pad_to)
        dealt = dataset.layout().batch
        if batch_size % dealt:
            raise ValueError(f"Loader batch_size={batch_size} must be a multiple of the dataset's batch_size={dealt} "
                             "(the batches the epoch is dealt to ranks in); otherwise a step would end inside one "
                             f"and no saved position could be exact: build the StreamingDataset with "
                             f"batch_size={batch_size}, or pass a multiple of {dealt}")
        self._dataset = dataset
        torch, resolved = resolve_device(device)
        shards = [info for d in dataset.datasets for info in d.shards]
        row_bytes = max(1, sum(s.bytes for s in shards) // max(1, sum(s.rows for s in shards)))
        group_batches = max(1, min(_MAX_GROUP_BATCHES, _GROUP_BYTES // (row_bytes * batch_size)))
        self._settings = BatchSettings(batch_size, group_batches, prefetch, threads, lists, pad_to, pad_value,
                                       drop_last, collate, torch, resolved)
        self._lead_steps = read_ahead(self._settings) * group_batches * (batch_size // dealt)
        dataset.warn_if_cache_below(self._lead_steps)
        self._ring = StagingRing(staging_allocator(torch, resolved))  # allocates nothing until an epoch reserves
        self._transform, self._workers, self._start_method = transform, workers, start_method
        self._timeout_s = timeout_s
        self._slot_bytes = parse_size(slot_bytes)
        self._pool: TransformPool | None = None
        self._tables = KeptTables()
        self._metrics = {"samples": 0, "batches": 0, "bytes": 0, "wait_s": 0.0, "seconds": 0.0, "device_waits": 0,
                         "cache_hits": 0, "cache_misses": 0, "cache_downloaded_bytes": 0}

    @property
    def dataset(self) -> StreamingDataset:
        """The dataset the batches come from (each pass read to its end advances its epoch; see its ``set_epoch``)."""
        return self._dataset

    def cache_need(self) -> int:
        """The smallest ``cache_limit`` with which this Loader reads the epoch downloading no shard twice.

        The dataset's :meth:`~StreamingDataset.cache_need` widened by how far
        this Loader reads ahead of the trainer (the node's ranks may be that
        far apart). Below it the Loader still works, downloading some shards
        again; it logs a warning with the figure when it is made.
        """
        return self._dataset.cache_need(self._lead_steps)

    def __len__(self) -> int:
        """Batches the rest of the current epoch holds for this rank."""
        samples, size = len(self._dataset), self._settings.batch_size
        return samples // size if self._settings.drop_last else -(-samples // size)

    def metrics(self) -> dict[str, Any]:
        """Counts of the last (or current) epoch: samples, batches, bytes, samples_per_s, bytes_per_s, wait_s, and
        the cache's hits, misses and bytes downloaded (``cache_downloaded_bytes``) by this rank; and ``to_device``,
        how batches reach a CUDA device: ``"pinned-host"`` (assembled in pinned staging, copied on a side stream the
        trainer's stream waits on by event), ``"host"`` (from the workers' shared memory, a copy the trainer waits
        for) or ``""`` (no CUDA device), and ``device_waits``, how many groups of batches were still being copied
        to the device when the trainer took their first batch (its stream may then have waited; 0: it never did).
        Shards are never read by GPUDirect Storage: a batch's rows are gathered from many record batches, which
        host memory does at its own speed and the device copy then moves whole."""
        m: dict[str, Any] = dict(self._metrics)
        seconds = max(m["seconds"], 1e-9)
        m["samples_per_s"] = m["samples"] / seconds
        m["bytes_per_s"] = m["bytes"] / seconds
        m["to_device"] = "" if not is_cuda(self._settings.torch, self._settings.device) else (
            "host" if self._workers else "pinned-host")
        return m

    def __iter__(self) -> Iterator[Any]:
        if self._workers:
            return self._from_workers()
        return self._from_threads()

    def close(self) -> None:
        """Stop the transform workers, if any (they stop with the loader anyway)."""
        if self._pool is not None:
            self._pool_stop()
            self._pool = None

    def _from_workers(self) -> Iterator[Any]:
        self._dataset._begin_pass()
        plan = self._dataset.plan(lead_steps=self._lead_steps)
        if self._pool is None or not self._pool.alive:
            self.close()
            self._pool = TransformPool(self._dataset, self._transform, self._workers, self._slot_bytes,
                                       self._start_method)
            self._pool_stop = weakref.finalize(self, self._pool.close)
        settings, metrics = self._settings, self._metrics
        metrics.update(samples=0, batches=0, bytes=0, wait_s=0.0, seconds=0.0)
        started = time.perf_counter()
        in_flight = max(2 * self._workers, settings.prefetch)
        batches = self._pool.epoch(plan, settings.batch_size, settings.drop_last, in_flight, self._timeout_s)
        try:
            while True:
                waited = time.perf_counter()
                try:
                    item = next(batches, None)
                except WorkerFailed as exc:
                    self.close()
                    raise LoaderError(str(exc)) from exc
                except TrainioError as exc:  # planning the workers' batches: a row digests file is damaged
                    raise LoaderError(f"the loader's work failed: {exc}") from exc
                metrics["wait_s"] += time.perf_counter() - waited
                if item is None:
                    break
                batch, count, nbytes = item
                batch = self._to_device(batch)
                metrics["samples"] += count
                metrics["batches"] += 1
                metrics["bytes"] += nbytes
                metrics["seconds"] = time.perf_counter() - started
                plan.position.advance(count)
                yield batch
                del batch, item
        finally:
            batches.close()
            metrics["seconds"] = time.perf_counter() - started
        self._dataset._end_pass()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The workers' arrays as tensors on the loader's device (as they are without torch)."""
        torch, device = self._settings.torch, self._settings.device
        if torch is None:
            return batch
        out = {}
        for name, value in batch.items():
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
                if str(device) != "cpu":
                    value = value.to(device)
            out[name] = value
        return out

    def _from_threads(self) -> Iterator[Any]:
        self._dataset._begin_pass()
        plan = self._dataset.plan(lead_steps=self._lead_steps)
        run = EpochPipeline(plan, self._settings, self._ring, self._tables)
        started = time.perf_counter()
        self._metrics.update(samples=0, batches=0, bytes=0, wait_s=0.0, seconds=0.0, device_waits=0)
        metrics = self._metrics
        consumed = plan.position.advance
        torch, device = self._settings.torch, self._settings.device
        try:
            while True:
                waited = time.perf_counter()
                item = run.ready.get()
                if item is DONE:
                    metrics["wait_s"] += time.perf_counter() - waited
                    if run.failure is not None:
                        raise LoaderError(f"the loader's background work failed: {run.failure}") from run.failure
                    self._dataset._end_pass()
                    return
                try:
                    batches, counts, nbytes, copy = item.result()
                except BaseException as exc:
                    raise LoaderError(f"the loader's background work failed: {exc}") from exc
                metrics["wait_s"] += time.perf_counter() - waited
                for batch, count, size in zip(batches, counts, nbytes):
                    if copy is not None and copy.wait(torch, device):
                        metrics["device_waits"] += 1
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
            metrics["cache_hits"], metrics["cache_misses"], metrics["cache_downloaded_bytes"] = run.cache_counts()
