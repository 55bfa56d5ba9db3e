"""The global sample order of an epoch, and how it is dealt to (rank, worker) consumers.

Pure functions of (seed, epoch, shard sizes, layout): no I/O, so every
property (exactly once, the same order under any layout) is testable alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Uneven = Literal["exact", "drop", "pad"]
DEFAULT_WINDOW = 1 << 18


@dataclass(frozen=True, slots=True)
class EpochOrder:
    """Which sample sits at each position of one epoch's global sequence.

    Shards are permuted with a generator seeded by ``(seed, epoch)``; their
    samples are laid end to end; then each run of ``window`` consecutive
    samples is permuted with a generator seeded by ``(seed, epoch, run)``.
    With ``shuffle=False`` the order is the dataset's own. Nothing here
    depends on ranks or workers, which is what makes resumption elastic.

    Attributes:
        shard_rows: Rows of every shard, in dataset order.
        seed, epoch: The shuffle's seed and the epoch number.
        shuffle: Whether to shuffle at all.
        window: Samples per shuffle window (default 2**18).
    """

    shard_rows: tuple[int, ...]
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    window: int = DEFAULT_WINDOW
    _sequence: np.ndarray = field(init=False, repr=False, compare=False)
    _starts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"shuffle window={self.window}: must be >= 1")
        count = len(self.shard_rows)
        sequence = generator(self.seed, self.epoch).permutation(count) if self.shuffle else np.arange(count)
        rows = np.asarray(self.shard_rows, dtype=np.int64).reshape(-1)[sequence]
        object.__setattr__(self, "_sequence", sequence)
        object.__setattr__(self, "_starts", np.concatenate(([0], np.cumsum(rows))).astype(np.int64))

    @property
    def size(self) -> int:
        """Samples in the epoch."""
        return int(self._starts[-1])

    def shard_sequence(self) -> np.ndarray:
        """The shards in the order their samples are laid out this epoch."""
        return self._sequence.copy()

    def samples(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row within shard) of each global position (0 <= position < size)."""
        positions = np.asarray(positions, dtype=np.int64)
        stream = self._stream_index(positions)
        slot = np.searchsorted(self._starts, stream, side="right") - 1
        return self._sequence[slot], stream - self._starts[slot]

    def _stream_index(self, positions: np.ndarray) -> np.ndarray:
        if not self.shuffle or positions.size == 0:
            return positions
        runs = positions // self.window
        low, high = int(runs.min()), int(runs.max())
        if low == high:  # the usual case: the positions lie in one window
            return self._in_window(positions, low)
        result = np.empty_like(positions)
        for run in range(low, high + 1):
            mask = runs == run
            if mask.any():
                result[mask] = self._in_window(positions[mask], run)
        return result

    def _in_window(self, positions: np.ndarray, run: int) -> np.ndarray:
        """Where ``positions``, all in shuffle window ``run``, land in the shard stream."""
        first = run * self.window
        permutation = _window_permutation(self.seed, self.epoch, run, min(self.window, self.size - first))
        placed: np.ndarray = first + permutation[positions - first]
        return placed


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
        start of the epoch's order, so every rank gets the same batch count).
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
        return positions % size if uneven == "pad" and size else positions

    def count(self, size: int, start: int = 0, uneven: Uneven = "exact") -> int:
        """How many samples this rank (all its workers) reads."""
        total = 0
        for worker in range(self.workers):
            layout = Layout(self.ranks, self.rank, self.workers, worker, self.batch)
            total += layout.positions(size, start, uneven).size
        return total


@functools.lru_cache(maxsize=4)
def _window_permutation(seed: int, epoch: int, run: int, length: int) -> np.ndarray:
    """The order of one shuffle window (kept for the next few calls: consumers read a window in many chunks)."""
    permutation = generator(seed, epoch, run).permutation(length)
    permutation.flags.writeable = False
    return permutation


def generator(*key: int) -> np.random.Generator:
    """A random generator determined by ``key`` alone (keys of different lengths never collide)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([abs(k) for k in key] + [len(key)])))
