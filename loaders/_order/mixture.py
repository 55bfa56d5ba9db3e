"""Several datasets read as one: fixed per-epoch proportions, interleaved deterministically, and one reader over all."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .._batch.row_tables import ShardRows
from .._read.row_check import RowDigestTable
from .._read.shard_reader import ShardReader
from .epoch_order import DEFAULT_WINDOW, EpochOrder, generator

MIX_BLOCK = 1 << 16


def apportion(weights: Sequence[float], total: int) -> tuple[int, ...]:
    """``total`` split in proportion to ``weights`` (largest remainders, ties to the first), summing to ``total``."""
    scale = sum(weights)
    if scale <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"mixing weights {list(weights)}: each must be >= 0 and at least one > 0")
    quotas = [w * total / scale for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return tuple(counts)


class MixBlocks:
    """An epoch of a mixture, ``counts[d]`` samples of dataset ``d``, cut into blocks of about 65536 samples."""

    __slots__ = ()
    counts: tuple[int, ...]

    @property
    def size(self) -> int:
        """Samples in the epoch."""
        return sum(self.counts)

    @property
    def _blocks(self) -> int:
        return mix_blocks(self.size)

    def _edges(self, blocks: np.ndarray) -> np.ndarray:
        """Samples of each dataset before each of ``blocks``: shape (len(blocks), datasets)."""
        return taken_before(self.counts, blocks)


@dataclass(frozen=True, slots=True)
class MixedOrder(MixBlocks):
    """Which sample of which dataset sits at each position of one epoch of a mixture.

    Dataset ``d`` contributes exactly ``counts[d]`` samples per epoch. Its
    samples come from an endless stream of passes over it, pass ``j`` in the
    order of :class:`EpochOrder` epoch ``j`` (its own seed): epoch ``e``
    takes the next ``counts[d]`` samples of that stream, so a dataset that
    gets fewer samples than it holds shows a different part each epoch and
    one that gets more is repeated, each pass shuffled anew. The epoch is cut
    into blocks of about 65536 positions, each holding every dataset's
    share (within one sample); inside a block the datasets are interleaved
    evenly, or at random (seeded by ``(seed, epoch, block)``) when shuffling.
    Nothing depends on ranks or workers.
    """

    shard_rows: tuple[tuple[int, ...], ...]
    counts: tuple[int, ...]
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    window: int = DEFAULT_WINDOW


    def shard_offsets(self) -> np.ndarray:
        """The first global shard number of each dataset."""
        return np.concatenate(([0], np.cumsum([len(rows) for rows in self.shard_rows])))

    def shard_sequence(self, parts: range | None = None) -> np.ndarray:
        """Every dataset's shards (global numbers), in the order their first pass lays them out."""
        offsets = self.shard_offsets()
        return np.concatenate([offsets[d] + self.stream(d, 0).shard_sequence() for d in range(len(self.counts))])

    def samples(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(global shard, row within shard) of each position (0 <= position < size)."""
        positions = np.asarray(positions, dtype=np.int64)
        source, nth = self._sources(positions)
        shards = np.empty_like(positions)
        rows = np.empty_like(positions)
        offsets = self.shard_offsets()
        for d in np.unique(source).tolist():
            mask = source == d
            size = sum(self.shard_rows[d])
            stream = self.epoch * self.counts[d] + nth[mask]
            passes, within = stream // size, stream % size
            local_shards = np.empty_like(within)
            local_rows = np.empty_like(within)
            for j in np.unique(passes).tolist():
                in_pass = passes == j
                local_shards[in_pass], local_rows[in_pass] = self.stream(d, j).samples(within[in_pass])
            shards[mask], rows[mask] = offsets[d] + local_shards, local_rows
        return shards, rows

    def stream(self, dataset: int, epoch: int) -> EpochOrder:
        """The order of pass ``epoch`` over dataset ``dataset``."""
        return EpochOrder(self.shard_rows[dataset], dataset_seed(self.seed, dataset), epoch, self.shuffle, self.window)

    @property
    def partitions(self) -> int:
        """One: a mixture cut into partitions is a :class:`~trainio.loaders._order.mixed_tape.PartitionedMixture`."""
        return 1

    def touched(self, parts: range, low: int, high: int) -> list[int]:
        """Every shard that positions ``[low, high)`` may read: each dataset's whole shuffle windows they fall in."""
        starts = self._edges(np.arange(self._blocks + 1, dtype=np.int64)).sum(axis=1)
        first, last = (min(int(np.searchsorted(starts, p, side="right")) - 1, self._blocks - 1)
                       for p in (low, max(low, high - 1)))
        edges = self._edges(np.asarray([first, last + 1]))
        offsets = self.shard_offsets()
        found: dict[int, None] = {}
        for d, count in enumerate(self.counts):
            size = sum(self.shard_rows[d])
            first, last = self.epoch * count + int(edges[0, d]), self.epoch * count + int(edges[1, d])
            for j in range(first // max(size, 1), -(-last // max(size, 1))):
                low_in, high_in = max(first - j * size, 0), min(last - j * size, size)
                shards = self.stream(d, j).touched(range(1), low_in, high_in)
                found.update(dict.fromkeys(int(offsets[d]) + s for s in shards))
        return list(found)

    def cache_need(self, parts: range, shard_bytes: Sequence[int], prefetch: int, lag: int = 0) -> int:
        """Bytes of the shards two adjacent shuffle windows (and each dataset's share of ``lag`` positions) of each
        dataset's stream touch, plus ``prefetch`` shards."""
        offsets = self.shard_offsets()
        windows = sum(self.stream(d, 0).cache_need(range(1), shard_bytes[offsets[d]:offsets[d + 1]], 0,
                                                   -(-lag * count // max(self.size, 1)))
                      for d, count in enumerate(self.counts))
        return windows + max(shard_bytes, default=0) * prefetch

    def _sources(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The dataset of each position, and which of that dataset's samples of the epoch it is."""
        edges = self._edges(np.arange(self._blocks + 1, dtype=np.int64))
        starts = edges.sum(axis=1)
        block_of = np.searchsorted(starts, positions, side="right") - 1
        source = np.empty_like(positions)
        nth = np.empty_like(positions)
        for b in np.unique(block_of).tolist():
            mask = block_of == b
            quota = edges[b + 1] - edges[b]
            layout = self._interleave(b, quota)
            local = positions[mask] - starts[b]
            chosen = layout[local]
            rank = np.empty(layout.size, dtype=np.int64)
            for d in range(quota.size):
                where = np.flatnonzero(layout == d)
                rank[where] = np.arange(where.size)
            source[mask] = chosen
            nth[mask] = edges[b][chosen] + rank[local]
        return source, nth

    def _interleave(self, block: int, quota: np.ndarray) -> np.ndarray:
        """The dataset of each position of one block, holding ``quota[d]`` positions of dataset ``d``."""
        if self.shuffle:
            layout = np.repeat(np.arange(quota.size), quota)
            return generator(self.seed, self.epoch, block, 1 << 30).permutation(layout)
        return even_interleave(tuple(quota.tolist()))[0]


def mix_blocks(size: int) -> int:
    """Blocks of about 65536 samples an epoch of a mixture of ``size`` samples is cut into."""
    return max(1, -(-size // MIX_BLOCK))


def taken_before(counts: Sequence[int], blocks: np.ndarray) -> np.ndarray:
    """Samples of each dataset (``counts`` an epoch) in the first ``blocks`` blocks: shape (len(blocks), datasets)."""
    taken: np.ndarray = (np.asarray(counts, dtype=np.int64)[None, :] * blocks[:, None]) // mix_blocks(sum(counts))
    return taken


@functools.lru_cache(maxsize=16)
def even_interleave(quota: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Datasets interleaved evenly, ``quota[d]`` places for dataset ``d``: each place's dataset, its rank among that
    dataset's places, and how many places of each dataset precede each place (shape ``(sum + 1, datasets)``)."""
    keys = np.concatenate([(np.arange(q) + 0.5) / q for q in quota])
    owners = np.repeat(np.arange(len(quota)), quota)
    layout = owners[np.lexsort((owners, keys))]
    before = np.zeros((layout.size + 1, len(quota)), dtype=np.int64)
    before[1:][np.arange(layout.size), layout] = 1
    np.cumsum(before, axis=0, out=before)
    rank = before[np.arange(layout.size), layout]
    for array in (layout, rank, before):
        array.flags.writeable = False
    return layout, rank, before


def dataset_seed(seed: int, dataset: int) -> int:
    """The seed of dataset ``dataset``'s own passes in a mixture seeded by ``seed``."""
    return int(np.random.SeedSequence([abs(seed), dataset]).generate_state(1)[0])


class MixedReader:
    """One :class:`ShardReader` per dataset of a mixture, addressed by global shard numbers."""

    def __init__(self, readers: Sequence[ShardReader], offsets: np.ndarray) -> None:
        self._readers = list(readers)
        self._offsets = offsets

    def _split(self, shard: int) -> tuple[ShardReader, int]:
        d = int(np.searchsorted(self._offsets, shard, side="right")) - 1
        return self._readers[d], shard - int(self._offsets[d])

    def leave_rows_to_readers(self, read_ahead: bool = True) -> None:
        """Every dataset's reader leaves rows to be checked by the caller (:meth:`ShardReader.leave_rows_to_readers`)."""
        for reader in self._readers:
            reader.leave_rows_to_readers(read_ahead)

    def plan(self, shards: Sequence[int], keep: Sequence[int] | None = None) -> None:
        """Each dataset's reader plans its own shards, and what its cache keeps, in the given order."""
        kept = self._per_reader(shards if keep is None else keep)
        for reader, mine, cached in zip(self._readers, self._per_reader(shards), kept):
            reader.plan(mine, cached)

    def expect(self, shards: Sequence[int]) -> None:
        """Each dataset's reader expects its own shards of the epoch, in the given order."""
        for reader, mine in zip(self._readers, self._per_reader(shards)):
            reader.expect(mine)

    def _per_reader(self, shards: Sequence[int]) -> list[list[int]]:
        per: list[list[int]] = [[] for _ in self._readers]
        for shard in shards:
            d = int(np.searchsorted(self._offsets, shard, side="right")) - 1
            per[d].append(shard - int(self._offsets[d]))
        return per

    def batch(self, shard: int, number: int) -> pa.RecordBatch:
        """Record batch ``number`` of global shard ``shard``, its rows checked (:meth:`ShardReader.batch`)."""
        reader, local = self._split(shard)
        return reader.batch(local, number)

    def batch_and_rows(self, shard: int, number: int) -> tuple[pa.RecordBatch, ShardRows | None]:
        """Record batch ``number`` of global shard ``shard``, and its rows to check (:meth:`ShardReader.batch_and_rows`)."""
        reader, local = self._split(shard)
        return reader.batch_and_rows(local, number)

    def row_digests(self, shard: int) -> RowDigestTable | None:
        """Global shard ``shard``'s row digests (:meth:`ShardReader.row_digests`)."""
        reader, local = self._split(shard)
        return reader.row_digests(local)

    def unchecked_batch(self, shard: int, number: int) -> pa.RecordBatch:
        """Record batch ``number`` of global shard ``shard``, unchecked (:meth:`ShardReader.unchecked_batch`)."""
        reader, local = self._split(shard)
        return reader.unchecked_batch(local, number)

    def check_whole(self, shard: int) -> None:
        """Return once global shard ``shard`` has matched the index whole (:meth:`ShardReader.check_whole`)."""
        reader, local = self._split(shard)
        reader.check_whole(local)

    def cache_stats(self) -> dict[str, int]:
        """Cache hits and misses, summed over the datasets."""
        total: dict[str, int] = {}
        for reader in self._readers:
            for key, value in reader.cache_stats().items():
                total[key] = total.get(key, 0) + value
        return total

    def close(self) -> None:
        """Close every dataset's reader."""
        for reader in self._readers:
            reader.close()


def mixture_sources(url: object) -> list[tuple[str, float | None]]:
    """``(url, weight or None)`` of each dataset named by a StreamingDataset's first argument."""
    if isinstance(url, (str, os.PathLike)):
        return [(os.fspath(url), None)]
    if not isinstance(url, Sequence) or not url:
        raise ValueError(f"{url!r}: give a dataset URL, or a non-empty list of URLs or (URL, weight) pairs")
    specs: list[tuple[str, float | None]] = []
    for item in url:
        if isinstance(item, (str, os.PathLike)):
            specs.append((os.fspath(item), None))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (str, os.PathLike)):
            specs.append((os.fspath(item[0]), float(item[1])))
        else:
            raise ValueError(f"{item!r}: each dataset is a URL or a (URL, weight) pair")
    return specs
