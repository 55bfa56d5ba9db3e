"""StreamingDataset: a dataset's samples, shuffled and dealt to (rank, worker), resumable mid-epoch."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from trainio.storage import FurthestInFuture, ShardCache, StoreError

from ._batch.collate import Collate
from ._format.columns import Columns, sample_of
from ._order.epoch_order import DEFAULT_WINDOW, EpochOrder, Layout, Uneven
from ._order.epoch_plan import EpochPlan, Position
from ._order.mixed_tape import PartitionedMixture
from ._order.mixture import MixedOrder, MixedReader, apportion, mixture_sources
from ._order.partitions import node_of, node_partitions
from ._read.dataset import Dataset
from ._read.shard_check import DEFAULT_READ_AHEAD
from ._read.shard_reader import ShardReader
from ._resumable import Resumable
from ._sizes import parse_size
from ._workers import SharedEpochs, in_worker, rank_and_world, shared_flag, worker_count, worker_info

_CHUNK = 8192
_DECODED_BATCHES = 4096
log = logging.getLogger("trainio.loaders.streaming")

if TYPE_CHECKING:
    from ._batch.list_layout import Lists
    _Base = object
else:
    try:
        from torch.utils.data import IterableDataset as _Base
    except ImportError:  # torch is optional: then a plain iterable
        _Base = object


Source = str | os.PathLike[str]


class StreamingDataset(Resumable, _Base):
    """The samples of a trainio dataset, one dict per sample, in a global order every layout agrees on.

    What to iterate: the dataset at ``url`` (local: memory-mapped in place,
    each shard hash-checked before its first sample, or each row as a
    :class:`Loader` copies it where the shard has row digests; threads read
    at most ``read_ahead_bytes`` past the shards the next samples need, per
    dataset of a mixture; remote: through a :class:`ShardCache` in
    ``cache_dir``, at most ``cache_limit`` bytes, the next ``prefetch_shards``
    shards downloading while the current one is read, the shard needed
    furthest in the future evicted first).

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
    of the epoch, or of the same partition, every rank the same count).

    Nodes: with ``partitions`` above 1, each epoch's shard-shuffled samples
    are cut into that many consecutive ranges of nearly equal size, each
    shuffled within itself in windows of ``shuffle_window // partitions``.
    Every global batch (``world_size * batch_size`` samples, a multiple of
    ``partitions``) takes the same number of samples from every partition,
    in partition order, so rank ``r``'s batch holds only samples of the
    partitions of its node (node ``r // ranks_per_node``), and each node
    of ``nodes`` reads ``partitions / nodes`` whole partitions: about
    ``1 / nodes`` of the shards, downloaded once into the node's shared
    ``cache_dir``. A global batch still mixes all partitions; one rank's
    batch does not. The default ``"auto"`` cuts each epoch into as many
    partitions as the job has nodes when the epoch begins; a state taken
    mid-epoch finishes its epoch with the partitions it was taken with, so
    a job may resume it on any node count that divides them (and the same
    global batch) and is refused otherwise, naming the node counts it can
    run on; from the next epoch on the partitions follow the new node
    count. ``partitions=1`` (or one node) is the unpartitioned order on
    any layout. ``ranks_per_node`` defaults to ``LOCAL_WORLD_SIZE``
    (torchrun sets it), else 1.

    Mixing: pass several datasets, as URLs or ``(URL, weight)`` pairs. Each
    epoch then holds ``epoch_size`` samples (default: as many as the
    datasets hold together), dataset ``d`` contributing exactly its weight's
    share (without weights, its own size: plain concatenation). A dataset
    whose share is below its size shows a different part of itself each
    epoch, one whose share is above is repeated, each pass shuffled anew;
    the datasets are interleaved evenly through the epoch (at random within
    blocks of 65536 samples when shuffling). See ``trainio.loaders._order.mixture.MixedOrder``. A
    single dataset with ``epoch_size`` is up- or down-sampled the same way.
    Cut into partitions, each partition holds every dataset's share of it
    (``trainio.loaders._order.mixed_tape.PartitionedMixture``).

    Rank and world size come from torch.distributed when it is initialized,
    else from ``RANK``/``WORLD_SIZE``, else 0 and 1 (or pass them).
    Resumption: :meth:`state_dict` / :meth:`load_state_dict`.

    Raises:
        StoreError: ``cache_limit`` is below the smallest cache this order needs.
        PartitionError: the nodes do not divide ``partitions``, or it does not divide the global batch.
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
        read_ahead_bytes: int | str = DEFAULT_READ_AHEAD,
        rank: int | None = None,
        world_size: int | None = None,
        partitions: int | Literal["auto"] = "auto",
        ranks_per_node: int | None = None,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if uneven not in ("exact", "drop", "pad"):
            raise ValueError(f"uneven={uneven!r}: must be 'exact', 'drop' or 'pad'")
        if prefetch_shards < 0:
            raise ValueError(f"prefetch_shards={prefetch_shards}: must be >= 0")
        self._read_ahead = 0 if read_ahead_bytes == 0 else parse_size(read_ahead_bytes)
        if partitions != "auto" and (not isinstance(partitions, int) or partitions < 1):
            raise ValueError(f"partitions={partitions!r}: must be 'auto' or an integer >= 1")
        if ranks_per_node is not None and ranks_per_node < 1:
            raise ValueError(f"ranks_per_node={ranks_per_node}: must be >= 1")
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
        self._partitions, self._ranks_per_node = partitions, ranks_per_node
        self._position = Position()
        self._sent_away = False  # pickled (to spawned DataLoader workers, say): the copies' progress never comes back
        self._worker_flag = shared_flag()  # set by any forked DataLoader worker that iterates this dataset
        self._epochs = SharedEpochs()
        self._epoch_chosen = False  # set_epoch or load_state_dict was called: the epoch is the caller's choice
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

    @property
    def partitions(self) -> int:
        """How many partitions the current epoch's order is cut into (see the class docstring)."""
        if self._position.partitions is not None:
            return self._position.partitions
        return self._node()[0] if self._partitions == "auto" else self._partitions

    def _node(self) -> tuple[int, int]:
        """(nodes in the job, this process's node)."""
        return node_of(*rank_and_world(self._rank, self._world), self._ranks_per_node)

    def node_partitions(self) -> range:
        """The partitions of the current epoch this process's node reads."""
        return node_partitions(self.partitions, *self._node())

    def order(self) -> EpochOrder | MixedOrder | PartitionedMixture:
        """The global order of the current epoch."""
        rows = tuple(tuple(s.rows for s in d.shards) for d in self._datasets)
        epoch, parts, global_batch = self._position.epoch, self.partitions, self.layout().ranks * self._batch
        if len(rows) == 1 and self._counts[0] == len(self._datasets[0]):
            return EpochOrder(rows[0], self._seed, epoch, self._shuffle, self._window, parts, global_batch)
        if parts == 1:
            return MixedOrder(rows, self._counts, self._seed, epoch, self._shuffle, self._window)
        return PartitionedMixture(rows, self._counts, self._seed, epoch, self._shuffle, self._window, parts,
                                  global_batch)

    def plan(self, workers: int = 1, worker: int = 0, *, lead_steps: int = 0) -> EpochPlan:
        """The current epoch as worker ``worker`` of ``workers`` of this rank reads it, from the resume position.

        What :class:`Loader` and this dataset's own iteration read; advance
        its ``position`` by the samples handed to the trainer. ``lead_steps``
        is how many training steps the reader reads ahead of the trainer (so
        the node's ranks may be that far apart: the cache keeps their span).
        """
        layout = self.layout(workers, worker)
        consumers = layout.ranks * layout.workers
        # A chunk never spans more than one shuffle window, so the shards it and the next
        # chunk touch (those kept mapped) fit the cache that _check_cache_size asked for.
        chunk = max(1, min(_CHUNK, self._window // consumers)) if self._shuffle else _CHUNK
        return EpochPlan(self.order(), layout, self._uneven, chunk, self._shards, self._first_rows, self._position,
                         self._open_reader, self.node_partitions(), lead_steps * layout.ranks * layout.batch)

    def __len__(self) -> int:
        """Samples this rank reads in the rest of the current epoch (all its workers together)."""
        self._sync_epoch()
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
        self._note_iteration()
        self._begin_pass()
        plan = self.plan(*worker_info())
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
        self._end_pass()

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
            return ShardReader(dataset, None, None, prefetch_shards=0, read_ahead=self._read_ahead)
        policy = FurthestInFuture()
        assert self._cache_dir is not None
        cache = ShardCache(dataset.store, self._cache_dir, self._cache_limit, policy=policy)
        return ShardReader(dataset, cache, policy, prefetch_shards=self._prefetch)

    def _announce_shards(self) -> None:
        """Start checking the local datasets' shards now, in the order the first epoch needs them.

        Whatever the job does before it iterates (build the model, say) then
        hides the check; the readers re-announce each epoch's order anyway.
        """
        sequence = self.order().shard_sequence(self.node_partitions())
        for d, dataset in enumerate(self._datasets):
            if dataset.is_local:
                low, high = int(self._shard_offsets[d]), int(self._shard_offsets[d + 1])
                dataset.checker().read_ahead = self._read_ahead
                dataset.checker().expect([s - low for s in sequence.tolist() if low <= s < high])

    def cache_need(self, lead_steps: int = 0) -> int:
        """The smallest ``cache_limit`` (bytes) with which this node reads the current epoch downloading no shard twice.

        The remote shards that two adjacent shuffle windows of each of the
        node's partitions touch (the partitions advance together), widened
        by ``lead_steps`` steps that a rank's reader may run ahead of
        another's (:class:`Loader` passes its read-ahead), plus the prefetch;
        0 when every dataset is local.
        """
        remote = sum(1 for d in self._datasets if not d.is_local)
        sizes = [0 if dataset.is_local else info.bytes for dataset, info in self._shards]
        lag = lead_steps * self.layout().ranks * self._batch
        return self.order().cache_need(self.node_partitions(), sizes, self._prefetch * remote, lag) if remote else 0

    def warn_if_cache_below(self, lead_steps: int) -> None:
        """Log a warning if the cache is below :meth:`cache_need` for a reader ``lead_steps`` ahead of the trainer.

        It still works (the shards it must keep fit), downloading some shards again.
        """
        need = self.cache_need(lead_steps)
        if self._cache_limit < need:
            log.warning("%s: cache_limit=%d bytes is below the %d bytes that reading %d steps ahead needs: some "
                        "shards will be downloaded twice (raise cache_limit to avoid it)",
                        ", ".join(d.url for d in self._datasets if not d.is_local), self._cache_limit, need, lead_steps)

    def _check_cache_size(self) -> None:
        """Fail now if :meth:`cache_need` exceeds the cache."""
        need = self.cache_need()
        if self._cache_limit < need:
            parts = len(self.node_partitions())
            windows = "two shuffle windows" if parts == 1 else f"two shuffle windows of each of its {parts} partitions"
            raise StoreError(", ".join(d.url for d in self._datasets if not d.is_local), "",
                             f"cache_limit={self._cache_limit} bytes is below the {need} bytes this node's order needs "
                             f"({windows} of shards plus {self._prefetch} prefetched)",
                             f"raise cache_limit to at least {need}, or shrink shuffle_window or prefetch_shards")
