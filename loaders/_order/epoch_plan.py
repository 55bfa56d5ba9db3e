"""EpochPlan: one consumer's part of an epoch and where each of its samples lives; Position: how far it got.

The boundary between :class:`~trainio.loaders.StreamingDataset` (which knows
the datasets, the order's settings and the resume state) and whatever reads
the samples (its own per-sample iteration, or :class:`~trainio.loaders.Loader`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .._format.index import ShardInfo
    from .._read.dataset import Dataset
    from .._read.shard_reader import ShardReader
    from .epoch_order import EpochOrder, Layout, Uneven
    from .mixed_tape import PartitionedMixture
    from .mixture import MixedOrder, MixedReader


class Position:
    """Where a dataset stands in its current epoch, as the process iterating it counts.

    Attributes:
        epoch: The epoch being read.
        start: Samples of the epoch's global sequence consumed (all ranks
            together) before this reading began: where a resumed epoch starts.
        skip: Of this consumer's own samples from ``start``, those already
            delivered before (a DataLoader worker's own saved position).
        delivered: Samples this process handed out since (:meth:`advance`).
        counted_here: Whether this process iterated, so ``delivered`` is the truth.
        partitions: The partitions a resumed epoch was begun with (None: the
            epoch begins here and takes the dataset's own setting).
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.start = 0
        self.skip = 0
        self.delivered = 0
        self.counted_here = False
        self.partitions: int | None = None

    def restart(self, epoch: int) -> None:
        """Read ``epoch`` from its beginning."""
        self.epoch, self.start, self.skip, self.delivered, self.partitions = epoch, 0, 0, 0, None

    def resume(self, epoch: int, start: int, skip: int, partitions: int) -> None:
        """Read ``epoch``, cut into ``partitions``, from ``start`` global samples on, this consumer's first ``skip`` left out."""
        self.epoch, self.start, self.skip, self.delivered, self.partitions = epoch, start, skip, 0, partitions

    def advance(self, samples: int) -> None:
        """Record that this process handed ``samples`` more samples to the trainer."""
        self.counted_here = True
        self.delivered += samples


@dataclass(frozen=True)
class EpochPlan:
    """What one consumer (a rank's process, or one of its DataLoader workers) reads of one epoch.

    Attributes:
        order: The epoch's global sample order.
        layout: The consumer's place: rank, world size, worker, batch dealt.
        uneven: What happens to a last global batch the ranks cannot share.
        chunk: Samples of the consumer's sequence planned at a time (within
            one shuffle window, so the shards kept mapped fit the cache).
        shards: Every shard, numbered across a mixture: its dataset and index entry.
        first_rows: For each shard, the first row of each of its record batches.
        position: Where the consumer starts, and what it delivers (advance it).
        open_reader: Makes a new reader of the shards, numbered as ``shards`` (close it when done).
        parts: The partitions of the order that this consumer's node reads
            (with its other ranks and workers).
        lag: Global positions by which the processes sharing this one's
            cache may read ahead of or behind it (their read-ahead).
    """

    order: EpochOrder | MixedOrder | PartitionedMixture
    layout: Layout
    uneven: Uneven
    chunk: int
    shards: Sequence[tuple[Dataset, ShardInfo]]
    first_rows: Sequence[np.ndarray]
    position: Position
    open_reader: Callable[[], ShardReader | MixedReader]
    parts: range = range(1)
    lag: int = 0

    def shard(self, shard: int) -> tuple[Dataset, ShardInfo]:
        """The dataset and index entry of shard number ``shard``."""
        return self.shards[shard]

    def source(self, shard: int) -> tuple[str, str]:
        """Shard ``shard``'s dataset URL and path, for messages."""
        dataset, info = self.shards[shard]
        return dataset.url, info.path

    def chunks(self, reader: ShardReader | MixedReader) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The consumer's samples from its position on, in chunks of (shard, row within shard) arrays.

        Plans ``reader`` ahead of each chunk: what to keep mapped and
        prefetch (this consumer's next shards), and what the cache keeps
        (what the whole node reads over the same steps, so one rank's
        downloads never evict another's next shards).
        """
        for _, shards, rows in self._chunks(reader):
            yield shards, rows

    def positioned(self, reader: Any) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Like :meth:`located`, with each sample's position in the epoch's global sequence first, and its row
        within its shard last."""
        for positions, shards, rows in self._chunks(reader):
            yield (positions, shards, *self._within_batches(shards, rows), rows)

    def _chunks(self, reader: Any) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        order = self.order
        reader.expect(order.shard_sequence(self.parts).tolist())
        positions = self.layout.positions(order.size, self.position.start, self.uneven)[self.position.skip:]
        chunk = self.chunk
        step = self.layout.ranks * self.layout.batch
        ahead: tuple[np.ndarray, np.ndarray, list[int]] | None = None
        for begin in range(0, positions.size, chunk):
            shards, rows, uses = ahead or _with_first_uses(order.samples(positions[begin:begin + chunk]))
            following = positions[begin + chunk:begin + 2 * chunk]
            ahead = _with_first_uses(order.samples(following)) if following.size else None
            mine = uses + ahead[2] if ahead is not None else uses
            last = int((following if following.size else positions[begin:begin + chunk])[-1])
            low, high = int(positions[begin]) // step * step - self.lag, (last // step + 1) * step + self.lag
            node = order.touched(self.parts, max(low, 0), high)  # what lags behind comes first: it is read soonest
            reader.plan(mine, list(dict.fromkeys(mine + node)))
            yield positions[begin:begin + chunk], shards, rows

    def located(self, reader: ShardReader | MixedReader) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Like :meth:`chunks`, with each row as (shard, record batch, row within that batch)."""
        for shards, rows in self.chunks(reader):
            yield (shards, *self._within_batches(shards, rows))

    def _within_batches(self, shards: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each (shard, row) as (record batch, row within it)."""
        batches = np.empty_like(rows)
        firsts = np.empty_like(rows)
        for shard in np.unique(shards):
            mask = shards == shard
            found = np.searchsorted(self.first_rows[shard], rows[mask], side="right") - 1
            batches[mask] = found
            firsts[mask] = self.first_rows[shard][found]
        return batches, rows - firsts


def _with_first_uses(located: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(shards, rows) and the distinct shards, in the order of their first use."""
    shards, rows = located
    if shards.size == 0:
        return shards, rows, []
    low = int(shards.min())
    first = np.full(int(shards.max()) - low + 1, shards.size, dtype=np.int64)
    np.minimum.at(first, shards - low, np.arange(shards.size, dtype=np.int64))
    used = np.flatnonzero(first < shards.size)
    return shards, rows, (used[np.argsort(first[used])] + low).tolist()
