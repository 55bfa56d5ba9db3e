"""The global sample order of an epoch, and how it is dealt to (rank, worker) consumers.

Pure functions of (seed, epoch, shard sizes, layout): no I/O, so every
property (exactly once, the same order under any layout) is testable alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .partitions import PartitionedShuffle, TapeOrder, generator

Uneven = Literal["exact", "drop", "pad"]
DEFAULT_WINDOW = 1 << 18

__all__ = ["DEFAULT_WINDOW", "EpochOrder", "Layout", "ShardStream", "Uneven", "generator"]


@dataclass(frozen=True, slots=True)
class ShardStream:
    """One pass over a dataset's shards, permuted by ``(seed, epoch)`` (unless not shuffling), samples laid end to end."""

    shard_rows: tuple[int, ...]
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    sequence: np.ndarray = field(init=False, repr=False, compare=False)
    starts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        count = len(self.shard_rows)
        sequence = generator(self.seed, self.epoch).permutation(count) if self.shuffle else np.arange(count)
        rows = np.asarray(self.shard_rows, dtype=np.int64).reshape(-1)[sequence]
        object.__setattr__(self, "sequence", sequence)
        object.__setattr__(self, "starts", np.concatenate(([0], np.cumsum(rows))).astype(np.int64))

    @property
    def size(self) -> int:
        """Samples in the pass."""
        return int(self.starts[-1])

    def samples(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row within shard) of each index of the pass."""
        slot = np.searchsorted(self.starts, indices, side="right") - 1
        return self.sequence[slot], indices - self.starts[slot]

    def shards_between(self, low: int, high: int) -> np.ndarray:
        """The shards holding indices ``[low, high)``, in pass order."""
        if high <= low:
            return self.sequence[:0]
        first = int(np.searchsorted(self.starts, low, side="right")) - 1
        return self.sequence[max(first, 0):int(np.searchsorted(self.starts, high, side="left"))]


@dataclass(frozen=True, slots=True)
class EpochOrder(TapeOrder):
    """Which sample sits at each position of one epoch's global sequence.

    Shards are permuted with a generator seeded by ``(seed, epoch)``; their
    samples are laid end to end; then each run of ``window`` consecutive
    samples is permuted with a generator seeded by ``(seed, epoch, run)``.
    With ``shuffle=False`` the order is the dataset's own. Nothing here
    depends on ranks or workers, which is what makes resumption elastic.

    With ``partitions`` above 1 the laid-out samples are cut into that many
    ranges instead, each shuffled in windows of ``window // partitions``,
    and every step of ``global_batch`` positions takes the same number of
    samples from each (see :class:`PartitionedShuffle`): the order then
    depends on the global batch too, and a node of ``nodes`` (dividing
    ``partitions``) reads only its partitions' shards.

    Attributes:
        shard_rows: Rows of every shard, in dataset order.
        seed, epoch: The shuffle's seed and the epoch number.
        shuffle: Whether to shuffle at all.
        window: Samples per shuffle window (default 2**18).
        partitions: Partitions of the epoch (default 1).
        global_batch: Samples per training step, all ranks together (a multiple of ``partitions``).
    """

    shard_rows: tuple[int, ...]
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    window: int = DEFAULT_WINDOW
    partitions: int = 1
    global_batch: int = 1
    _tape: ShardStream = field(init=False, repr=False, compare=False)
    _shuffle: PartitionedShuffle = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        stream = ShardStream(self.shard_rows, self.seed, self.epoch, self.shuffle)
        object.__setattr__(self, "_tape", stream)
        object.__setattr__(self, "_shuffle", PartitionedShuffle(
            stream.size, self.seed, self.epoch, self.shuffle, self.window, self.partitions, self.global_batch))


@dataclass(frozen=True, slots=True)
class Layout:
    """Who consumes the global sequence: ``ranks`` processes with ``workers`` loaders each, ``batch`` samples a batch.

    Global batch ``j`` (positions ``[start + j*batch, start + (j+1)*batch)``)
    goes to rank ``j % ranks``; a rank's ``k``-th batch goes to worker
    ``k % workers``, which is the order in which a DataLoader collects
    batches from its workers. So each training step consumes the same
    ``ranks * batch`` positions whatever ``workers`` is, and the same global
    sequence whatever the layout for a given global batch size.
    """

    ranks: int = 1
    rank: int = 0
    workers: int = 1
    worker: int = 0
    batch: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.ranks and 0 <= self.worker < self.workers and self.batch >= 1):
            raise ValueError(f"invalid layout {self}")

    def positions(self, size: int, start: int = 0, uneven: Uneven = "exact") -> np.ndarray:
        """The global positions this consumer reads, in the order it reads them.

        ``start`` is where the epoch resumes (positions before it were
        consumed). ``uneven`` decides what happens to a last global batch the
        ranks cannot share equally: ``exact`` (every sample once; some ranks
        get a short or no last batch), ``drop`` (the partial global batch is
        skipped this epoch) or ``pad`` (it is filled with samples from the
        start of the epoch's order, so every rank gets the same batch count:
        such positions lie at or past ``size``, and the order says which
        samples they repeat).
        """
        remaining = max(0, size - start)
        step = self.ranks * self.batch
        if uneven == "drop":
            remaining -= remaining % step
        elif uneven == "pad":
            remaining += -remaining % step
        consumers = self.ranks * self.workers
        if consumers == 1:
            positions = np.arange(start, start + remaining, dtype=np.int64)
        else:
            batches = -(-remaining // self.batch)
            mine = np.arange(self.rank + self.ranks * self.worker, batches, consumers, dtype=np.int64)
            positions = (mine[:, None] * self.batch + np.arange(start, start + self.batch, dtype=np.int64)).ravel()
            if mine.size and (past := int(mine[-1] + 1) * self.batch - remaining) > 0:  # only the last batch is short
                positions = positions[:positions.size - past]
        return positions

    def count(self, size: int, start: int = 0, uneven: Uneven = "exact") -> int:
        """How many samples this rank (all its workers) reads."""
        total = 0
        for worker in range(self.workers):
            layout = Layout(self.ranks, self.rank, self.workers, worker, self.batch)
            total += layout.positions(size, start, uneven).size
        return total
