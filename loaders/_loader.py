"""Loader: batches assembled in-process into a ring of staging buffers, then handed to the trainer's device."""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from trainio.storage import TrainioError

from ._assemble import Columns, Lists, Staging, assemble, runs, sample_of
from ._streaming import StreamingDataset

_DECODED = 4096
_DONE = object()


class LoaderError(TrainioError, RuntimeError):
    """The loader's background thread failed; the original error is the ``__cause__``."""


class Loader:
    """Batches of a :class:`StreamingDataset`, assembled by a background thread of this process.

    A producer thread copies each sample's bytes once, out of the
    memory-mapped shards into one of ``prefetch`` preallocated staging slots
    (pinned host memory when the device is CUDA); numpy and pyarrow release
    the GIL for those copies. On a CUDA device each batch is then copied to
    the device with non-blocking copies on a dedicated stream, and the
    consumer's stream waits on that copy's event; a slot is reused only once
    its copy has finished. On the CPU the batch's tensors are views of the
    slot, and the slot is reused only once every tensor of that batch has
    been released (garbage collected): keep a batch as long as you like, at
    the cost of the loader allocating another slot.

    Batches are dicts of tensors (numpy arrays when torch is absent); see
    :func:`~trainio.loaders._assemble.assemble` for list fields (``lists=
    "pad"`` or ``"pack"``, ``pad_to``, ``pad_value``). ``collate`` replaces
    assembly: it receives the list of sample dicts. Errors of the
    background thread are raised in the consumer as :class:`LoaderError`
    with the original as cause; leaving the loop early stops the thread and
    releases every shard. :meth:`metrics` gives samples/s, bytes/s, the time
    the consumer waited and cache hits and misses.
    """

    def __init__(
        self,
        dataset: StreamingDataset,
        batch_size: int,
        *,
        device: Any = "cpu",
        prefetch: int = 4,
        lists: Lists = "pad",
        pad_to: int | None = None,
        pad_value: int = 0,
        drop_last: bool = False,
        collate: Callable[[list[dict[str, Any]]], Any] | None = None,
    ) -> None:
        if batch_size < 1 or prefetch < 1:
            raise ValueError(f"batch_size={batch_size}, prefetch={prefetch}: both must be >= 1")
        if lists not in ("pad", "pack"):
            raise ValueError(f"lists={lists!r}: must be 'pad' or 'pack'")
        self._dataset = dataset
        self._batch_size = batch_size
        self._prefetch = prefetch
        self._lists: Lists = lists
        self._pad_to, self._pad_value = pad_to, pad_value
        self._drop_last = drop_last
        self._collate = collate
        self._torch, self._device = _resolve_device(device)
        self._metrics = {"samples": 0, "batches": 0, "bytes": 0, "wait_s": 0.0, "seconds": 0.0,
                         "cache_hits": 0, "cache_misses": 0}

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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        run = _Run(self)
        started = time.perf_counter()
        self._metrics.update(samples=0, batches=0, bytes=0, wait_s=0.0, seconds=0.0)
        try:
            while True:
                waited = time.perf_counter()
                item = run.ready.get()
                self._metrics["wait_s"] += time.perf_counter() - waited
                if item is _DONE:
                    run.raise_failure()
                    return
                batch, count, size, event = item
                if event is not None:
                    _wait_on_device(self._torch, self._device, batch, event)
                self._metrics["samples"] += count
                self._metrics["batches"] += 1
                self._metrics["bytes"] += size
                self._metrics["seconds"] = time.perf_counter() - started
                self._dataset.count_consumed(count)
                yield batch
        finally:
            run.stop()
            self._metrics["seconds"] = time.perf_counter() - started
            self._metrics["cache_hits"], self._metrics["cache_misses"] = run.cache_counts()


class _Run:
    """One epoch's producer thread, its staging slots and its hand-off queue."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        self.ready: queue.Queue[Any] = queue.Queue(maxsize=loader._prefetch)
        self.free: queue.Queue[int] = queue.Queue()
        self.slots = [Staging(self._allocator()) for _ in range(loader._prefetch + 1)]
        for index in range(len(self.slots)):
            self.free.put(index)
        self.inflight: list[tuple[Any, int]] = []
        self.decoded: OrderedDict[tuple[int, int], Columns] = OrderedDict()
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self.reader = loader._dataset.reader()
        self.stream = loader._torch.cuda.Stream(device=loader._device) if _is_cuda(loader) else None
        self.thread = threading.Thread(target=self._produce, name="trainio-loader", daemon=True)
        self.thread.start()

    def _allocator(self) -> Callable[[int], np.ndarray]:
        torch = self.loader._torch
        if _is_cuda(self.loader):
            return lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
        return lambda nbytes: np.empty(nbytes, dtype=np.uint8)

    def cache_counts(self) -> tuple[int, int]:
        stats = self.reader.cache_stats()
        return stats.get("hits", 0), stats.get("misses", 0)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise LoaderError(f"the loader's background thread failed: {self.failure}") from self.failure

    def stop(self) -> None:
        self.stopping.set()
        while self.thread.is_alive():
            try:
                self.ready.get(timeout=0.05)
            except queue.Empty:
                pass
        self.reader.close()

    # -- the producer thread ---------------------------------------------------------------

    def _produce(self) -> None:
        dataset = self.loader._dataset
        size = self.loader._batch_size
        empty = np.zeros(0, dtype=np.int64)
        left: tuple[np.ndarray, ...] = (empty, empty, empty)
        try:
            for chunk in dataset.located(dataset.layout(), self.reader):
                shards, batches, rows = (np.concatenate(pair) for pair in zip(left, chunk))
                start = 0
                while rows.size - start >= size:
                    end = start + size
                    if not self._emit(shards[start:end], batches[start:end], rows[start:end]):
                        return
                    start = end
                left = (shards[start:], batches[start:], rows[start:])
            if left[2].size and not self.loader._drop_last:
                self._emit(*left)
        except BaseException as exc:  # handed to the consumer
            self.failure = exc
        finally:
            self._put(_DONE)

    def _columns(self, shard: int, number: int) -> Columns:
        columns = self.decoded.get((shard, number))
        if columns is None:
            columns = Columns.of(self.reader.batch(shard, number))
            self.decoded[(shard, number)] = columns
            if len(self.decoded) > _DECODED:
                self.decoded.popitem(last=False)
        return columns

    def _put(self, item: Any) -> bool:
        while not self.stopping.is_set():
            try:
                self.ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _emit(self, shards: np.ndarray, batches: np.ndarray, rows: np.ndarray) -> bool:
        loader = self.loader
        shard_list, batch_list = shards.tolist(), batches.tolist()
        parts = [(self._columns(shard_list[key], batch_list[key]), begin, end, row)
                 for begin, end, row, key in runs(shards, batches, rows)]
        if loader._collate is not None:
            samples = [sample_of(columns, row + k) for columns, begin, end, row in parts for k in range(end - begin)]
            return self._put((loader._collate(samples), rows.size, 0, None))
        index = self._take_slot()
        arrays = assemble(parts, rows.size, self.slots[index], lists=loader._lists, pad_to=loader._pad_to,
                          pad_value=loader._pad_value)
        size = sum(a.nbytes for a in arrays.values() if isinstance(a, np.ndarray))
        batch, event = self._hand_over(arrays, index)
        return self._put((batch, rows.size, size, event))

    def _take_slot(self) -> int:
        """A free staging slot; a new one when the consumer still holds every existing slot's batch.

        Holding batches therefore costs memory, never a deadlock; a slow
        consumer is held back by the bounded ``ready`` queue instead.
        """
        self._reap_copies()
        try:
            return self.free.get_nowait()
        except queue.Empty:
            self.slots.append(Staging(self._allocator()))
            return len(self.slots) - 1

    def _reap_copies(self) -> None:
        """Free the slots whose host-to-device copies have finished."""
        still = []
        for event, index in self.inflight:
            if event.query():
                self.free.put(index)
            else:
                still.append((event, index))
        self.inflight = still

    def _hand_over(self, arrays: dict[str, Any], index: int) -> tuple[dict[str, Any], Any]:
        """The batch as the consumer gets it, and the copy's event (None on the CPU); frees slot ``index`` when safe."""
        torch = self.loader._torch
        keep = [v[...] if isinstance(v, np.ndarray) else v for v in arrays.values()]
        views = dict(zip(arrays, keep))
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                batch = {k: torch.from_numpy(v).to(self.loader._device, non_blocking=True)
                         if isinstance(v, np.ndarray) else v for k, v in views.items()}
                event = torch.cuda.Event()
                event.record(self.stream)
            self.inflight.append((event, index))
            return batch, event
        _free_when_collected([v for v in keep if isinstance(v, np.ndarray)], self.free, index)
        if torch is None:
            return views, None
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in views.items()}, None


def _wait_on_device(torch: Any, device: Any, batch: dict[str, Any], event: Any) -> None:
    """Make the consumer's current stream wait for the batch's copy, and tell the allocator it uses the tensors."""
    stream = torch.cuda.current_stream(device)
    stream.wait_event(event)
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            value.record_stream(stream)


def _free_when_collected(arrays: list[np.ndarray], free: queue.Queue[int], index: int) -> None:
    remaining = [len(arrays)]
    lock = threading.Lock()

    def released() -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                free.put(index)

    if not arrays:
        free.put(index)
    for array in arrays:
        weakref.finalize(array, released)


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
