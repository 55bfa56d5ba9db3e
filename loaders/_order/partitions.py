"""How an epoch is cut into partitions that nodes read apart, and where each position lands on the epoch's tape.

The tape is an epoch's samples laid end to end before any sample is
shuffled (shards permuted, a mixture's datasets interleaved). Partitions
are consecutive ranges of it; each global step takes ``global_batch /
partitions`` samples from every partition, partition ``p``'s share at
offsets ``[p*share, (p+1)*share)`` of the step. Dealing global batch ``j``
to rank ``j % ranks`` then gives every node of ``nodes`` (dividing the
partitions) exactly the samples of ``partitions / nodes`` consecutive
partitions, whatever the ranks per node or DataLoader workers. Pure
functions of their arguments: no I/O.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class PartitionError(ValueError):
    """A partition count the job's layout cannot read: it does not divide the global batch, or nodes do not divide it."""


def node_of(rank: int, world: int, ranks_per_node: int | None) -> tuple[int, int]:
    """``(nodes, node of rank)`` for ``world`` ranks, ``ranks_per_node`` each (default: ``LOCAL_WORLD_SIZE``, else 1).

    Raises:
        PartitionError: the ranks are not a whole number of nodes.
    """
    per_node = ranks_per_node
    if per_node is None:
        found = os.environ.get("LOCAL_WORLD_SIZE", "1")
        if not found.isdigit() or int(found) < 1:
            raise PartitionError(f"LOCAL_WORLD_SIZE={found!r}: must be a whole number >= 1 (ranks per node)")
        per_node = int(found)
    if world % per_node:
        raise PartitionError(f"{world} ranks are not a whole number of nodes of {per_node} ranks each "
                             "(ranks_per_node, else LOCAL_WORLD_SIZE): pass ranks_per_node")
    return world // per_node, rank // per_node


def node_partitions(partitions: int, nodes: int, node: int) -> range:
    """The partitions node ``node`` of ``nodes`` reads (with one partition: all of it, on any node count).

    Raises:
        PartitionError: ``nodes`` does not divide ``partitions``; the message names the node counts that do.
    """
    if partitions == 1:
        return range(1)
    if partitions % nodes:
        counts = ", ".join(str(n) for n in range(1, partitions + 1) if partitions % n == 0)
        raise PartitionError(f"this epoch's order has {partitions} partitions and the job runs on {nodes} nodes, "
                             f"which does not divide it: run on {counts} nodes (or finish the epoch on one of "
                             f"those and change the node count at an epoch boundary)")
    per_node = partitions // nodes
    return range(node * per_node, (node + 1) * per_node)


@dataclass(frozen=True, slots=True)
class PartitionedShuffle:
    """Where each position of an epoch of ``size`` samples lands on its tape.

    Partition lengths are whole steps of ``share = global_batch //
    partitions`` samples, except that the last, partial step gives its
    positions to the first partitions in order, ``share`` each: so position
    ``x`` (step ``x // global_batch``, offset ``o``) is sample ``(x //
    global_batch) * share + o % share`` of partition ``o // share``, also in
    the last step. Within a partition, samples are shuffled in windows of
    ``window // partitions`` samples (``window`` for one partition), each
    window seeded by ``(seed, epoch, partitions, partition, window)`` (by
    ``(seed, epoch, window)`` for one partition: the order of an
    unpartitioned epoch). Positions at or past ``size`` (the ``pad``
    policy's) repeat the first samples of the same partition.
    """

    size: int
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    window: int = 1 << 18
    partitions: int = 1
    global_batch: int = 1
    lengths: np.ndarray = field(init=False, repr=False, compare=False)
    starts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"shuffle window={self.window}: must be >= 1")
        if self.partitions < 1 or self.global_batch < 1:
            raise ValueError(f"partitions={self.partitions}, global batch={self.global_batch}: each must be >= 1")
        if self.global_batch % self.partitions:
            raise PartitionError(f"partitions={self.partitions} does not divide the global batch of "
                                 f"{self.global_batch} samples (ranks x batch_size): every step takes the same "
                                 "number of samples from each partition; choose a divisor of it")
        steps, tail = divmod(self.size, self.global_batch)
        share = self.share
        lengths = steps * share + np.clip(tail - share * np.arange(self.partitions, dtype=np.int64), 0, share)
        object.__setattr__(self, "lengths", lengths)
        object.__setattr__(self, "starts", np.concatenate(([0], np.cumsum(lengths))).astype(np.int64))

    @property
    def share(self) -> int:
        """Samples each partition gives a full step."""
        return self.global_batch // self.partitions

    @property
    def part_window(self) -> int:
        """Samples per shuffle window within a partition."""
        return self.window if self.partitions == 1 else max(1, self.window // self.partitions)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(partition, sample within partition) of each position; positions past ``size`` pad from their partition."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.partitions == 1:
            return np.zeros_like(positions), positions % max(self.size, 1)
        steps, offsets = np.divmod(positions, self.global_batch)
        parts, within = np.divmod(offsets, self.share)
        local = steps * self.share + within
        lengths = self.lengths[parts]
        over = local >= lengths
        if over.any():
            has = over & (lengths > 0)
            local[has] = (local[has] - lengths[has]) % lengths[has]
            if (empty := over & (lengths == 0)).any():  # a dataset smaller than one step: pad from its start
                parts[empty], local[empty] = self.locate(positions[empty] % self.size)
        return parts, local

    def tape_index(self, positions: np.ndarray) -> np.ndarray:
        """Where each position's sample sits on the tape."""
        parts, local = self.locate(positions)
        if not self.shuffle or local.size == 0:
            unshuffled: np.ndarray = self.starts[parts] + local
            return unshuffled
        width = self.part_window
        runs = local // width
        keys = parts * (int(runs.max()) + 1) + runs
        placed = np.empty_like(local)
        for key in np.unique(keys).tolist():
            mask = keys == key
            part, run = divmod(key, int(runs.max()) + 1)
            first = run * width
            permutation = self._permutation(part, run, min(width, int(self.lengths[part]) - first))
            placed[mask] = self.starts[part] + first + permutation[local[mask] - first]
        return placed

    def _permutation(self, part: int, run: int, length: int) -> np.ndarray:
        if self.partitions == 1:
            return _window_permutation((self.seed, self.epoch, run), length)
        return _window_permutation((self.seed, self.epoch, self.partitions, part, run), length)

    def before(self, part: int, position: int) -> int:
        """How many of partition ``part``'s samples lie at global positions below ``position``."""
        if self.partitions == 1:
            return min(position, self.size)
        steps, offset = divmod(min(position, self.size), self.global_batch)
        return steps * self.share + min(max(offset - part * self.share, 0), self.share)

    def windows(self, part: int, low: int, high: int) -> tuple[int, int]:
        """The tape range of the shuffle windows that samples ``[low, high)`` of partition ``part`` fall in."""
        length = int(self.lengths[part])
        low, high = min(low, length), min(high, length)
        if high <= low:
            return 0, 0
        if self.shuffle:
            width = self.part_window
            low, high = low // width * width, min(length, -(-high // width) * width)
        start = int(self.starts[part])
        return start + low, start + high


def generator(*key: int) -> np.random.Generator:
    """A random generator determined by ``key`` alone (keys of different lengths never collide)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([abs(k) for k in key] + [len(key)])))


@functools.lru_cache(maxsize=8)
def _window_permutation(key: tuple[int, ...], length: int) -> np.ndarray:
    """The order of one shuffle window (kept for the next few calls: consumers read a window in many chunks)."""
    permutation = generator(*key).permutation(length)
    permutation.flags.writeable = False
    return permutation


class Tape(Protocol):
    """An epoch's samples laid end to end before shuffling: what :class:`PartitionedShuffle` indexes into."""

    def samples(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row within shard) of each tape index."""
        ...

    def shards_between(self, low: int, high: int) -> np.ndarray:
        """The shards holding tape indices ``[low, high)``, in tape order."""
        ...


class TapeOrder:
    """An epoch order that is a :class:`Tape` read through a :class:`PartitionedShuffle`.

    Subclasses set ``_tape`` and ``_shuffle`` when they are made; the rest is shared.
    """

    __slots__ = ()
    _tape: Tape
    _shuffle: PartitionedShuffle

    @property
    def size(self) -> int:
        """Samples in the epoch."""
        return self._shuffle.size

    def samples(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row within shard) of each global position (``0 <= position``; past ``size`` is padding)."""
        tape, shuffle = self._tape, self._shuffle
        return tape.samples(shuffle.tape_index(np.asarray(positions, dtype=np.int64)))

    def touched(self, parts: range, low: int, high: int) -> list[int]:
        """Every shard that positions ``[low, high)`` of partitions ``parts`` may read: their whole shuffle windows.

        The joint near future of the ranks reading ``parts`` (a node), the
        partitions' shards taken in turn, so what every partition needs
        first comes first.
        """
        tape, shuffle = self._tape, self._shuffle
        lists = [tape.shards_between(*shuffle.windows(p, shuffle.before(p, low), shuffle.before(p, high))).tolist()
                 for p in parts]
        merged: dict[int, None] = {}
        for row in range(max((len(x) for x in lists), default=0)):
            for found in lists:
                if row < len(found):
                    merged.setdefault(found[row])
        return list(merged)

    def shard_sequence(self, parts: range | None = None) -> np.ndarray:
        """The shards partitions ``parts`` (default: all) read this epoch, about in the order they first need them."""
        tape, shuffle = self._tape, self._shuffle
        parts = range(shuffle.partitions) if parts is None else parts
        longest = max((int(shuffle.lengths[p]) for p in parts), default=0)
        step = max(shuffle.part_window, -(-longest // 256))
        merged: dict[int, None] = {}
        for begin in range(0, longest, step):
            for p in parts:
                low, high = shuffle.windows(p, begin, begin + step)
                merged.update(dict.fromkeys(tape.shards_between(low, high).tolist()))
        return np.fromiter(merged, dtype=np.int64, count=len(merged))

    def cache_need(self, parts: range, shard_bytes: Sequence[int], prefetch: int, lag: int = 0) -> int:
        """Bytes of the shards two adjacent shuffle windows of each of ``parts`` touch, summed, plus ``prefetch`` shards.

        The smallest cache that lets the ranks reading ``parts`` keep what
        they read next while downloading no shard twice, when one of them
        may read up to ``lag`` global positions ahead of another: the span
        held then grows by the partitions' share of ``lag``. Shards are
        numbered as ``shard_bytes`` is indexed.
        """
        tape, shuffle = self._tape, self._shuffle
        largest = max(shard_bytes, default=0)
        behind = -(-lag // shuffle.partitions)
        if not shuffle.shuffle and not behind:
            return largest * (len(parts) + prefetch)
        width = shuffle.part_window if shuffle.shuffle else behind
        bytes_of = np.asarray(shard_bytes, dtype=np.int64)
        windows = -(-max((int(shuffle.lengths[p]) for p in parts), default=0) // width)
        together = np.zeros(windows, dtype=np.int64)  # the partitions advance in step: add them window by window
        for p in parts:
            start, length = int(shuffle.starts[p]), int(shuffle.lengths[p])
            for run, begin in enumerate(range(0, length, width)):
                end = start + min(length, begin + 2 * width + behind)
                together[run] += bytes_of[tape.shards_between(start + begin, end)].sum()
        return int(together.max(initial=0)) + largest * prefetch
