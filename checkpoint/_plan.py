"""Who writes what in a multi-rank save: the same plan, computed by every rank from what all ranks hold.

Every chunk of every array gets exactly one writer: one of the ranks holding
it. Arrays held whole by every rank (replicated) and small enough are packed,
and the pack is rank 0's; every other distinct box goes to the rank among its
holders that has the fewest bytes to write so far, biggest boxes first, so
replicated tensors are spread over the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trainio.storage import CheckpointError

from ._boxes import Box, chunk_indices, grid_chunks
from ._layout import ArraySpec, pack_spec
from ._staging import aligned
from ._tree import ArrayLeaf

PACK_OWNER = 0
"""The rank that writes the pack, the metadata documents and the manifest."""


def describe_leaves(leaves: Sequence[ArrayLeaf]) -> list[list[Any]]:
    """What this rank holds, as JSON-able rows for the exchange between ranks."""
    return [[leaf.path, leaf.kind, leaf.dtype, leaf.stored, list(leaf.shape), leaf.itemsize,
             None if leaf.box is None else leaf.box.to_json()] for leaf in leaves]


@dataclass
class Unit:
    """One distinct box of an array, the rank that writes it, and the chunks it writes."""

    path: str
    box: Box
    owner: int
    chunks: list[tuple[int, ...]] = field(default_factory=list)


@dataclass
class Plan:
    """The layout of a multi-rank step and each rank's share of its files."""

    arrays: dict[str, ArraySpec]
    pack: ArraySpec | None
    units: list[Unit]

    def owned(self, rank: int) -> list[Unit]:
        """The boxes ``rank`` writes."""
        return [unit for unit in self.units if unit.owner == rank]

    def packed_paths(self) -> set[str]:
        """The arrays that live in the pack."""
        return {path for path, spec in self.arrays.items() if spec.packed is not None}


def _rank_rows(rows: list[list[Any]], rank: int, reference: list[list[Any]]) -> None:
    if [r[0] for r in rows] != [r[0] for r in reference]:
        missing = sorted({r[0] for r in reference} ^ {r[0] for r in rows})
        raise CheckpointError(f"rank {rank}'s state has other arrays than rank 0's (e.g. {missing[:3]}); every "
                              "rank must save the same state structure")
    for mine, theirs in zip(rows, reference, strict=True):
        if mine[1:6] != theirs[1:6]:
            raise CheckpointError(f"{mine[0]}: rank {rank} holds {mine[2]}{mine[4]} ({mine[1]}), rank 0 holds "
                                  f"{theirs[2]}{theirs[4]} ({theirs[1]}); every rank must save the same arrays")


def make_plan(per_rank: list[list[list[Any]]], chunk_bytes: int, pack_bytes: int, codec: str | None) -> Plan:
    """The plan for the arrays ``per_rank[r]`` (from :func:`describe_leaves`) says rank ``r`` holds.

    Raises:
        CheckpointError: the ranks' states differ in structure, or the ranks
            together do not hold every part of an array.
    """
    reference = per_rank[0]
    for rank, rows in enumerate(per_rank[1:], start=1):
        _rank_rows(rows, rank, reference)
    arrays: dict[str, ArraySpec] = {}
    pack_end = 0
    units: list[Unit] = []
    holders: dict[tuple[str, Box], list[int]] = {}
    for index, (path, kind, dtype, stored, shape_list, itemsize, _) in enumerate(reference):
        shape = tuple(shape_list)
        boxes = [Box.whole(shape) if rows[index][6] is None else Box(tuple(rows[index][6][0]),
                                                                       tuple(rows[index][6][1]))
                 for rows in per_rank]
        nbytes = math.prod(shape) * itemsize
        if all(row[index][6] is None for row in per_rank) and nbytes <= pack_bytes:
            pack_end = aligned(pack_end)
            arrays[path] = ArraySpec(path, kind, dtype, stored, shape, grid_chunks(shape, itemsize, chunk_bytes, []),
                                     pack_end)
            pack_end += nbytes
            continue
        distinct = sorted({b for b in boxes if not b.empty}, key=lambda b: b.offset)
        arrays[path] = ArraySpec(path, kind, dtype, stored, shape, grid_chunks(shape, itemsize, chunk_bytes, distinct),
                                 None, codec)
        for box in distinct:
            holders[(path, box)] = [r for r, b in enumerate(boxes) if b == box]
            units.append(Unit(path, box, -1))
    pack = pack_spec(pack_end, chunk_bytes, codec) if any(s.packed is not None for s in arrays.values()) else None
    _assign_owners(units, holders, arrays, len(per_rank), pack_end)
    _assign_chunks(units, arrays)
    return Plan(arrays, pack, units)


def _assign_owners(units: list[Unit], holders: dict[tuple[str, Box], list[int]], arrays: dict[str, ArraySpec],
                   world: int, pack_bytes: int) -> None:
    load = [0] * world
    load[PACK_OWNER] += pack_bytes
    for unit in sorted(units, key=lambda u: (-math.prod(u.box.shape) * arrays[u.path].itemsize, u.path,
                                             u.box.offset)):
        unit.owner = min(holders[(unit.path, unit.box)], key=lambda r: (load[r], r))
        load[unit.owner] += math.prod(unit.box.shape) * arrays[unit.path].itemsize


def _assign_chunks(units: list[Unit], arrays: dict[str, ArraySpec]) -> None:
    claimed: dict[str, set[tuple[int, ...]]] = {}
    for unit in units:
        taken = claimed.setdefault(unit.path, set())
        unit.chunks = [i for i in chunk_indices(unit.box, arrays[unit.path].chunks) if i not in taken]
        taken.update(unit.chunks)
    for path, spec in arrays.items():
        if spec.packed is not None or not all(spec.shape):
            continue
        total = math.prod(-(-n // c) for n, c in zip(spec.shape, spec.chunks, strict=True))
        if len(claimed.get(path, ())) != total:
            raise CheckpointError(f"{path}: the ranks together hold {len(claimed.get(path, ()))} of its {total} "
                                  "chunks; a sharded tensor must be covered by the ranks' shards")
