"""A mixture's epoch cut into partitions: its datasets interleaved on one tape, partitioned and shuffled as one."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .epoch_order import DEFAULT_WINDOW, ShardStream
from .mixture import MixBlocks, dataset_seed, even_interleave
from .partitions import PartitionedShuffle, TapeOrder


@dataclass(frozen=True)
class MixedTape(MixBlocks):
    """One epoch of a mixture laid end to end before any sample is shuffled.

    Dataset ``d`` contributes exactly ``counts[d]`` samples: the next ones
    of its endless stream of passes, pass ``j`` its shards permuted by
    ``(its seed, j)`` and their samples in order, so epoch ``e`` takes
    stream samples ``[e*counts[d], (e+1)*counts[d])``. The tape is cut into
    blocks of about 65536 samples, each holding every dataset's share
    (within one sample), the datasets interleaved evenly inside a block. So
    any range of the tape holds each dataset's share of it, and each
    dataset's samples in it are consecutive in its stream.
    """

    shard_rows: tuple[tuple[int, ...], ...]
    counts: tuple[int, ...]
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    _offsets: np.ndarray = field(init=False, repr=False, compare=False)
    _starts: np.ndarray = field(init=False, repr=False, compare=False)
    _passes: dict[tuple[int, int], ShardStream] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        blocks = np.arange(self._blocks + 1, dtype=np.int64)
        object.__setattr__(self, "_offsets", np.concatenate(([0], np.cumsum([len(r) for r in self.shard_rows]))))
        object.__setattr__(self, "_starts", self._edges(blocks).sum(axis=1))
        object.__setattr__(self, "_passes", {})

    def _pass(self, dataset: int, number: int) -> ShardStream:
        found = self._passes.get((dataset, number))
        if found is None:
            found = ShardStream(self.shard_rows[dataset], dataset_seed(self.seed, dataset), number, self.shuffle)
            if len(self._passes) > 64:
                self._passes.clear()
            self._passes[(dataset, number)] = found
        return found

    def _dataset_samples(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The dataset of each tape index, and which of that dataset's samples of the epoch it is."""
        blocks = np.searchsorted(self._starts, indices, side="right") - 1
        local = indices - self._starts[blocks]
        edges = self._edges(blocks)
        quotas = self._edges(blocks + 1) - edges
        source = np.empty_like(indices)
        nth = np.empty_like(indices)
        kinds, which = np.unique(quotas, axis=0, return_inverse=True)
        for k, quota in enumerate(kinds.tolist()):
            mask = which.reshape(-1) == k
            layout, rank, _ = even_interleave(tuple(quota))
            here = local[mask]
            source[mask] = layout[here]
            nth[mask] = edges[mask, layout[here]] + rank[here]
        return source, nth

    def _before(self, index: int) -> np.ndarray:
        """Samples of each dataset at tape indices below ``index``."""
        index = min(max(index, 0), self.size)
        block = min(int(np.searchsorted(self._starts, index, side="right")) - 1, self._blocks - 1)
        edges = self._edges(np.asarray([block, block + 1]))
        before: np.ndarray = edges[0] + even_interleave(tuple((edges[1] - edges[0]).tolist()))[2][index - self._starts[block]]
        return before

    def samples(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(global shard, row within shard) of each tape index."""
        indices = np.asarray(indices, dtype=np.int64)
        source, nth = self._dataset_samples(indices)
        shards = np.empty_like(indices)
        rows = np.empty_like(indices)
        for d in np.unique(source).tolist():
            mask = source == d
            size = sum(self.shard_rows[d])
            passes, within = np.divmod(self.epoch * self.counts[d] + nth[mask], size)
            local_shards = np.empty_like(within)
            local_rows = np.empty_like(within)
            for j in np.unique(passes).tolist():
                in_pass = passes == j
                local_shards[in_pass], local_rows[in_pass] = self._pass(d, j).samples(within[in_pass])
            shards[mask], rows[mask] = self._offsets[d] + local_shards, local_rows
        return shards, rows

    def shards_between(self, low: int, high: int) -> np.ndarray:
        """The shards (global numbers) holding tape indices ``[low, high)``, dataset by dataset."""
        if high <= low:
            return np.zeros(0, dtype=np.int64)
        firsts, lasts = self._before(low), self._before(high)
        found: list[np.ndarray] = []
        for d, count in enumerate(self.counts):
            size = sum(self.shard_rows[d])
            first, last = self.epoch * count + int(firsts[d]), self.epoch * count + int(lasts[d])
            for j in range(first // max(size, 1), -(-last // max(size, 1))):
                shards = self._pass(d, j).shards_between(max(first - j * size, 0), min(last - j * size, size))
                found.append(self._offsets[d] + shards)
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class PartitionedMixture(TapeOrder):
    """A mixture's epoch cut into ``partitions``: a :class:`MixedTape` read through a :class:`PartitionedShuffle`.

    Each dataset keeps exactly its ``counts`` share of the epoch, and each
    partition holds every dataset's share of it (the tape is even at every
    scale), so a node reads only its part of each dataset.
    """

    shard_rows: tuple[tuple[int, ...], ...]
    counts: tuple[int, ...]
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    window: int = DEFAULT_WINDOW
    partitions: int = 1
    global_batch: int = 1
    _tape: MixedTape = field(init=False, repr=False, compare=False)
    _shuffle: PartitionedShuffle = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tape = MixedTape(self.shard_rows, self.counts, self.seed, self.epoch, self.shuffle)
        object.__setattr__(self, "_tape", tape)
        object.__setattr__(self, "_shuffle", PartitionedShuffle(
            tape.size, self.seed, self.epoch, self.shuffle, self.window, self.partitions, self.global_batch))
