"""StreamingDataset: a dataset's samples, shuffled and dealt to (rank, worker), resumable mid-epoch."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from trainio.storage import FurthestInFuture, ShardCache, StoreError

from ._batch.collate import Collate
from ._format.columns import Columns, sample_of
from ._order.epoch_order import DEFAULT_WINDOW, EpochOrder, Layout, Uneven
from ._order.epoch_plan import EpochPlan, Position
from ._order.mixture import MixedOrder, MixedReader, apportion, mixture_sources
from ._order.resume_state import (
    HOW_TO_KNOW,
    STATE_FORMAT,
    STATE_VERSION,
    PositionUnknown,
    ResumeMismatch,
    check_state,
    check_worker_yielded,
    state_differences,
)
from ._read.dataset import Dataset
from ._read.shard_reader import ShardReader, shard_bytes_needed
from ._sizes import parse_size
from ._workers import in_worker, rank_and_world, shared_flag, worker_count, worker_info

_CHUNK = 8192
_DECODED_BATCHES = 4096

if TYPE_CHECKING:
    from ._batch.list_layout import Lists
    _Base = object
else:
    try:
        from torch.utils.data import IterableDataset as _Base
    except ImportError:  # torch is optional: then a plain iterable
        _Base = object


Source = str | os.PathLike[str]


class StreamingDataset(_Base):
    """The samples of a trainio dataset, one dict per sample, in a global order every layout agrees on.

    What to iterate: the dataset at ``url`` (local: memory-mapped in place;
    remote: through a :class:`ShardCache` in ``cache_dir``, at most
    ``cache_limit`` bytes, the next ``prefetch_shards`` shards downloading
    while the current one is read, the shard needed furthest in the future
    evicted first).

    How to iterate: each epoch's order is fixed by ``(seed, epoch)``: shards
    are shuffled, then samples within windows of ``shuffle_window`` samples
    (a dataset smaller than the window is shuffled as a whole). That global
    sequence is cut into batches of ``batch_size`` dealt round-robin to the
    ranks, and each rank's batches round-robin to its DataLoader workers, so
    every sample is read exactly once and each training step sees the same
    samples whatever the number of ranks and workers (for the same global
    batch). Pass the same ``batch_size`` to the DataLoader. ``uneven`` says
    what happens to a last global batch the ranks cannot share equally:
    ``"exact"`` (default: every sample once, some ranks get a short or no last
    batch), ``"drop"`` (skipped this epoch) or ``"pad"`` (filled from the start
    of the epoch, every rank the same count).

    Mixing: pass several datasets, as URLs or ``(URL, weight)`` pairs. Each
    epoch then holds ``epoch_size`` samples (default: as many as the
    datasets hold together), dataset ``d`` contributing exactly its weight's
    share (without weights, its own size: plain concatenation). A dataset
    whose share is below its size shows a different part of itself each
    epoch, one whose share is above is repeated, each pass shuffled anew;
    the datasets are interleaved evenly through the epoch (at random within
    blocks of 65536 samples when shuffling). See ``trainio.loaders._order.mixture.MixedOrder``. A
    single dataset with ``epoch_size`` is up- or down-sampled the same way.

    Rank and world size come from torch.distributed when it is initialized,
    else from ``RANK``/``WORLD_SIZE``, else 0 and 1 (or pass them).
    Resumption: :meth:`state_dict` / :meth:`load_state_dict`.

    Raises:
        StoreError: ``cache_limit`` is below the smallest cache this order needs.
    """

    def __init__(
        self,
        url: Source | Sequence[Source | tuple[Source, float]],
        *,
        epoch_size: int | None = None,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_window: int = DEFAULT_WINDOW,
        uneven: Uneven = "exact",
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit: int | str = 50 * 10**9,
        prefetch_shards: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if uneven not in ("exact", "drop", "pad"):
            raise ValueError(f"uneven={uneven!r}: must be 'exact', 'drop' or 'pad'")
        if prefetch_shards < 0:
            raise ValueError(f"prefetch_shards={prefetch_shards}: must be >= 0")
        specs = mixture_sources(url)
        self._datasets = tuple(Dataset(source) for source, _ in specs)
        for dataset in self._datasets[1:]:
            if not dataset.schema.remove_metadata().equals(self._datasets[0].schema.remove_metadata()):
                raise ValueError(f"{dataset.url}: its schema ({dataset.schema}) differs from {self._datasets[0].url}'s "
                                 f"({self._datasets[0].schema}); a mixture's datasets must share one schema")
        sizes = [len(d) for d in self._datasets]
        given = [w for _, w in specs if w is not None]
        if given and len(given) != len(specs):
            raise ValueError("give a mixing weight for every dataset or for none")
        self._weights = tuple(given) if given else tuple(map(float, sizes))
        if epoch_size is not None and epoch_size < 0:
            raise ValueError(f"epoch_size={epoch_size}: must be >= 0")
        self._counts = apportion(self._weights, sum(sizes) if epoch_size is None else epoch_size)
        self._epoch_size = epoch_size
        self._shard_offsets = np.concatenate(([0], np.cumsum([len(d.shards) for d in self._datasets])))
        self._shards = [(d, info) for d in self._datasets for info in d.shards]
        self._batch = batch_size or 1
        self._shuffle = shuffle
        self._seed = seed
        self._window = shuffle_window
        self._uneven: Uneven = uneven
        self._prefetch = prefetch_shards
        self._rank, self._world = rank, world_size
        self._position = Position()
        self._sent_away = False  # pickled (to spawned DataLoader workers, say): the copies' progress never comes back
        self._worker_flag = shared_flag()  # set by any forked DataLoader worker that iterates this dataset
        self._cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self._cache_limit = parse_size(cache_limit)
        for dataset in self._datasets:
            if not dataset.is_local and self._cache_dir is None:
                raise StoreError(dataset.url, "", "a remote dataset needs a cache_dir on local disk")
        self._check_cache_size()
        self._first_rows = [np.asarray([b.first_row for b in info.batches], dtype=np.int64) for _, info in self._shards]
        self._announce_shards()

    # -- what is iterated ------------------------------------------------------------

    @property
    def dataset(self) -> Dataset:
        """The dataset the samples come from (the first one of a mixture)."""
        return self._datasets[0]

    @property
    def datasets(self) -> tuple[Dataset, ...]:
        """Every dataset of the mixture, in the order given."""
        return self._datasets

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""
        return self._position.epoch

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` next (from its start, unless a loaded state resumes inside it)."""
        if epoch != self._position.epoch:
            self._position.restart(epoch)

    def layout(self, workers: int = 1, worker: int = 0) -> Layout:
        """This process's place in the job (rank, world size) for a given worker."""
        rank, world = rank_and_world(self._rank, self._world)
        return Layout(ranks=world, rank=rank, workers=workers, worker=worker, batch=self._batch)

    def collate(self, *, lists: Lists = "auto", pad_to: int | None = None, pad_value: int = 0) -> Collate:
        """A DataLoader ``collate_fn`` that builds from this dataset's samples the batches :class:`Loader` builds.

        Worth it where rows vary in length (binary, ragged lists): each batch
        then crosses from a worker as one shared-memory segment instead of
        one pickled object per sample. For fixed-length fields torch's
        default collate is about as good.
        """
        schema = self._datasets[0].schema
        list_fields = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
                       or pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
        return Collate(lists=lists, pad_to=pad_to, pad_value=pad_value, list_fields=list_fields)

    def order(self) -> EpochOrder | MixedOrder:
        """The global order of the current epoch."""
        rows = tuple(tuple(s.rows for s in d.shards) for d in self._datasets)
        if len(rows) == 1 and self._counts[0] == len(self._datasets[0]):
            return EpochOrder(rows[0], self._seed, self._position.epoch, self._shuffle, self._window)
        return MixedOrder(rows, self._counts, self._seed, self._position.epoch, self._shuffle, self._window)

    def plan(self, workers: int = 1, worker: int = 0) -> EpochPlan:
        """The current epoch as worker ``worker`` of ``workers`` of this rank reads it, from the resume position.

        What :class:`Loader` and this dataset's own iteration read; advance
        its ``position`` by the samples handed to the trainer.
        """
        layout = self.layout(workers, worker)
        consumers = layout.ranks * layout.workers
        # A chunk never spans more than one shuffle window, so the shards it and the next
        # chunk touch (those kept mapped) fit the cache that _check_cache_size asked for.
        chunk = max(1, min(_CHUNK, self._window // consumers)) if self._shuffle else _CHUNK
        return EpochPlan(self.order(), layout, self._uneven, chunk, self._shards, self._first_rows, self._position,
                         self._open_reader)

    def __len__(self) -> int:
        """Samples this rank reads in the rest of the current epoch (all its workers together)."""
        return self.layout(worker_count()).count(sum(self._counts), self._position.start, self._uneven)

    # -- iteration ----------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        self._sent_away = True
        state = dict(self.__dict__)
        state["_worker_flag"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._worker_flag = shared_flag()
        self._sent_away = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan(*worker_info())
        self._note_iteration()
        position = plan.position
        reader = plan.open_reader()
        samplers: OrderedDict[int, Callable[[int], dict[str, Any]]] = OrderedDict()  # by shard << 32 | batch
        try:
            for shards, batches, rows in plan.located(reader):
                for key, row in zip(((shards.astype(np.int64) << 32) | batches).tolist(), rows.tolist()):
                    sample = samplers.get(key)
                    if sample is None:
                        shard = key >> 32
                        columns = Columns.of(reader.batch(shard, key & 0xFFFFFFFF), source=plan.source(shard))
                        sample = samplers[key] = sample_of(columns)
                        if len(samplers) > _DECODED_BATCHES:
                            samplers.popitem(last=False)
                    position.delivered += 1
                    yield sample(row)
        finally:
            reader.close()

    def _note_iteration(self) -> None:
        """Mark who iterates: this process (its count is the position) or a DataLoader worker (the shared flag)."""
        if in_worker():
            if self._worker_flag is not None:
                self._worker_flag[0] = 1
        else:
            self._position.counted_here = True

    def _open_reader(self) -> ShardReader | MixedReader:
        """A new reader of this dataset's shards, numbered across the mixture (close it when done)."""
        readers = [self._reader(d) for d in self._datasets]
        return readers[0] if len(readers) == 1 else MixedReader(readers, self._shard_offsets)

    def _reader(self, dataset: Dataset) -> ShardReader:
        if dataset.is_local:
            return ShardReader(dataset, None, None, prefetch_shards=0)
        policy = FurthestInFuture()
        assert self._cache_dir is not None
        cache = ShardCache(dataset.store, self._cache_dir, self._cache_limit, policy=policy)
        return ShardReader(dataset, cache, policy, prefetch_shards=self._prefetch)

    def _announce_shards(self) -> None:
        """Start checking the local datasets' shards now, in the order the first epoch needs them.

        Whatever the job does before it iterates (build the model, say) then
        hides the check; the readers re-announce each epoch's order anyway.
        """
        sequence = self.order().shard_sequence()
        for d, dataset in enumerate(self._datasets):
            if dataset.is_local:
                low, high = int(self._shard_offsets[d]), int(self._shard_offsets[d + 1])
                dataset.checker().expect([s - low for s in sequence.tolist() if low <= s < high])

    def _check_cache_size(self) -> None:
        """Fail now if the remote datasets' shards that two shuffle windows touch, plus the prefetch, exceed the cache."""
        order = self.order()
        need = 0
        for d, dataset in enumerate(self._datasets):
            if dataset.is_local:
                continue
            shards = dataset.shards
            sequence = order.shard_sequence() if isinstance(order, EpochOrder) else order.stream(d, 0).shard_sequence()
            need += shard_bytes_needed([s.rows for s in shards], [s.bytes for s in shards], sequence.tolist(),
                                       self._window, self._shuffle, self._prefetch)
        if self._cache_limit < need:
            urls = ", ".join(d.url for d in self._datasets if not d.is_local)
            raise StoreError(urls, "", f"cache_limit={self._cache_limit} bytes is below the {need} bytes this order "
                             f"needs (two shuffle windows of shards plus {self._prefetch} prefetched)",
                             f"raise cache_limit to at least {need}, or shrink shuffle_window or prefetch_shards")

    # -- resumption -------------------------------------------------------------------

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Where the epoch stands, as JSON-able data naming what it belongs to.

        Three ways to take it:

        - ``state_dict(consumed=steps * global_batch)`` anywhere: the samples
          of the epoch's global sequence consumed so far, across all ranks.
          Resumable under any layout.
        - ``state_dict()`` in the process that iterates the dataset itself
          (no DataLoader workers, or through :class:`Loader`): counted here,
          in whole global batches. Resumable under any layout.
        - ``state_dict()`` inside a DataLoader worker, as torchdata's
          ``StatefulDataLoader`` calls it: this worker's own position, which
          only the same worker of a DataLoader with as many workers can
          resume (torchdata's convention).

        Raises:
            PositionUnknown: ``state_dict()`` without ``consumed`` in a process
                that did not iterate the dataset while DataLoader workers (or
                other copies) did, such as the main process of a stock
                DataLoader with workers: its count would be wrong.
            ValueError: ``consumed`` is not an integer within the epoch.
        """
        worker = None
        size = sum(self._counts)
        position = self._position
        if consumed is not None:
            step = self.layout().ranks * self._batch
            if not isinstance(consumed, (int, np.integer)) or isinstance(consumed, bool) or not \
                    0 <= consumed <= size + step:
                raise ValueError(f"state_dict(consumed={consumed!r}): must be an integer from 0 to {size}, the "
                                 "samples of the current epoch consumed by all ranks together")
            consumed = min(int(consumed), size)  # beyond: the padded last global batch, the epoch is done
        elif in_worker():
            workers, worker_id = worker_info()
            consumed = position.start
            worker = {"id": worker_id, "workers": workers, "yielded": position.skip + position.delivered}
        else:
            self._check_position_known()
            layout = self.layout()
            consumed = min(size, position.start + (position.delivered // layout.batch) * layout.batch * layout.ranks)
        state = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "epoch": position.epoch, "consumed": int(consumed),
            "seed": self._seed, "shuffle": self._shuffle, "shuffle_window": self._window,
            "epoch_size": self._epoch_size,
            "datasets": [{"url": d.url, "index_xxh3": d.index_xxh3, "weight": w}
                         for d, w in zip(self._datasets, self._weights)],
        }
        if worker is not None:
            state["worker"] = worker
        return state

    def _check_position_known(self) -> None:
        """Raise :class:`PositionUnknown` if this process's count is not the position (see :meth:`state_dict`)."""
        in_workers = self._worker_flag is not None and self._worker_flag[0] != 0
        if in_workers or (self._sent_away and not self._position.counted_here):
            where = "DataLoader workers iterated it" if in_workers else "it was sent to other processes"
            raise PositionUnknown(f"{self.dataset.url}: state_dict() cannot know the position: {where}, and this "
                                  f"process's copy never sees their progress (it would say epoch "
                                  f"{self._position.epoch}, consumed {self._position.start}); {HOW_TO_KNOW}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where ``state`` was taken, under this (possibly different) layout.

        Every field is checked before anything changes.

        Raises:
            ResumeMismatch: the state is malformed (naming the field: a
                negative or too large ``consumed``, a negative ``epoch``, a
                ``worker.yielded`` beyond that worker's share), or belongs to
                another dataset, seed or shuffle configuration (naming each
                difference), or is one DataLoader worker's position and this
                is not the same worker of as many.
        """
        size = sum(self._counts)
        check_state(state, size)
        differences = state_differences(state, self.state_dict(consumed=0))
        if differences:
            raise ResumeMismatch("cannot resume: " + "; ".join(differences) +
                                 " (resuming would silently change the sample order)")
        skip = self._worker_skip(state.get("worker"), size, state["consumed"])
        self._position.resume(state["epoch"], state["consumed"], skip)

    def _worker_skip(self, saved: dict[str, int] | None, size: int, start: int) -> int:
        """How many of this worker's samples a per-worker state says were consumed (0 for a global state)."""
        if saved is None:
            return 0
        workers, worker = worker_info()
        if (saved["workers"], saved["id"]) != (workers, worker):
            raise ResumeMismatch(f"this state is DataLoader worker {saved['id']} of {saved['workers']}'s "
                                 f"own position; it cannot resume worker {worker} of {workers}: resume it with as "
                                 "many workers, or save a global position with state_dict(consumed=steps * "
                                 "global_batch)")
        share = self.layout(workers, worker).positions(size, start, self._uneven).size
        return check_worker_yielded(saved, share)
