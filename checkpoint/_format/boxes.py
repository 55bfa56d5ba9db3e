"""Boxes of a global array: the part each rank holds, the chunk grid that follows them, and copies between them.

A box is the hyper-rectangle of a global array that one rank holds (a
DTensor's local shard, or the whole array for a replicated tensor). The chunk
grid of a sharded array is chosen so that every box is a union of whole
chunks (or reaches the array's edge), so every chunk lies in the boxes of
exactly the ranks that hold it and one of them writes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    """A hyper-rectangle of a global array: its first index and its extent along every dimension."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]

    @classmethod
    def whole(cls, shape: Sequence[int]) -> Box:
        """The box of the whole array."""
        return cls((0,) * len(shape), tuple(shape))

    @property
    def end(self) -> tuple[int, ...]:
        """One past the last index along every dimension."""
        return tuple(o + n for o, n in zip(self.offset, self.shape, strict=True))

    @property
    def empty(self) -> bool:
        """Whether the box holds no element."""
        return any(n == 0 for n in self.shape)

    def intersect(self, other: Box) -> Box | None:
        """The common part of two boxes, or None when they do not overlap."""
        start = tuple(max(a, b) for a, b in zip(self.offset, other.offset, strict=True))
        end = tuple(min(a, b) for a, b in zip(self.end, other.end, strict=True))
        if any(e <= s for s, e in zip(start, end, strict=True)):
            return None
        return Box(start, tuple(e - s for s, e in zip(start, end, strict=True)))

    def relative_to(self, outer: Box) -> tuple[slice, ...]:
        """This box as slices of an array holding ``outer``."""
        return tuple(slice(o - p, o - p + n) for o, p, n in zip(self.offset, outer.offset, self.shape, strict=True))

    def to_json(self) -> list[list[int]]:
        """The box as ``[offset, shape]``."""
        return [list(self.offset), list(self.shape)]


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (at least 1)."""
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for candidate in (d, n // d):
                if best < candidate <= limit:
                    best = candidate
    return best


def grid_chunks(shape: tuple[int, ...], itemsize: int, target_bytes: int, boxes: Sequence[Box]) -> tuple[int, ...]:
    """A chunk shape of at most ``target_bytes`` whose grid every box is aligned to.

    Along each dimension the chunk length divides every box boundary that is
    not the array's edge; within that, chunks are as large as ``target_bytes``
    allows, contiguous in C order (dimensions before the split have length 1).
    With one box, the whole array, this is :func:`~._layout.chunk_shape`.
    """
    edges = [[edge for box in boxes if not box.empty for edge in (box.offset[dim], box.end[dim]) if 0 < edge < n]
             for dim, n in enumerate(shape)]
    return cell_chunks(shape, itemsize, target_bytes, [math.gcd(*dim_edges) for dim_edges in edges])


def cell_chunks(shape: tuple[int, ...], itemsize: int, target_bytes: int, steps: Sequence[int]) -> tuple[int, ...]:
    """:func:`grid_chunks` from ``steps``, the gcd of every inner box boundary along each dimension (0: none)."""
    cells = [step if step else max(n, 1) for step, n in zip(steps, shape, strict=True)]
    chunks = [1] * len(shape)
    trailing = itemsize
    for dim in range(len(shape) - 1, -1, -1):
        cell = cells[dim]
        if trailing * cell <= target_bytes:
            chunks[dim] = cell
            trailing *= cell
            continue
        limit = max(1, target_bytes // trailing)
        # A cell spanning the whole dimension may be cut anywhere (the edge chunk is padded);
        # otherwise the cut must divide the cell so box boundaries stay on the grid.
        chunks[dim] = limit if cell >= shape[dim] else _largest_divisor(cell, limit)
        break
    return tuple(chunks)


def chunk_indices(box: Box, chunks: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """The grid index of every chunk that overlaps ``box``, in C order."""
    if box.empty:
        return
    ranges = [range(o // c, -(-e // c)) for o, e, c in zip(box.offset, box.end, chunks, strict=True)]
    yield from _product(ranges)


def _product(ranges: list[range]) -> Iterator[tuple[int, ...]]:
    if not ranges:
        yield ()
        return
    for i in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (i, *rest)


def chunk_origin(index: tuple[int, ...], chunks: tuple[int, ...]) -> Box:
    """The full box of chunk ``index`` (it may reach past the array's edge)."""
    return Box(tuple(i * c for i, c in zip(index, chunks, strict=True)), chunks)


def chunk_box(index: tuple[int, ...], chunks: tuple[int, ...], shape: tuple[int, ...]) -> Box:
    """The part of the array that chunk ``index`` covers (cut at the array's edge)."""
    offset = tuple(i * c for i, c in zip(index, chunks, strict=True))
    return Box(offset, tuple(min(c, n - o) for o, c, n in zip(offset, chunks, shape, strict=True)))


def contiguous_run(part: Box, outer: Box) -> tuple[int, int] | None:
    """``part`` as one ``(start, count)`` element range of a C-ordered array holding ``outer``, if it is one."""
    inner = part.relative_to(outer)
    full = True
    for dim in range(len(outer.shape) - 1, -1, -1):
        if not full and part.shape[dim] != 1:
            return None
        full = full and inner[dim].start == 0 and part.shape[dim] == outer.shape[dim]
    start = 0
    for dim, s in enumerate(inner):
        start = start * outer.shape[dim] + s.start
    return start, math.prod(part.shape)


def chunk_bytes_of(block: np.ndarray, part: Box, chunks: tuple[int, ...], index: tuple[int, ...]) -> bytes:
    """The file of chunk ``index``: ``block`` (the elements of ``part``) placed in a zero-padded chunk."""
    padded = np.zeros(chunks, block.dtype)
    padded[part.relative_to(chunk_origin(index, chunks))] = block
    return padded.tobytes()
