"""Who writes what in a multi-rank save: the same plan, computed by every rank from what all ranks hold.

Every chunk of every array gets exactly one writer: one of the ranks holding
it. Arrays held whole by every rank (replicated) and small enough are packed,
and the pack is rank 0's; every other distinct box goes to the rank among its
holders that has the fewest bytes to write so far, biggest boxes first, so
replicated tensors are spread over the ranks. A replicated array must have
the same digest on every rank. The arrays of a rank's :class:`PerRank` values
are that rank's alone: written whole by it, never packed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainio.storage import CheckpointError

from .._format.boxes import Box, chunk_indices, grid_chunks
from .._format.placement import Mesh
from .._format.state_tree import ArrayLeaf
from .._format.zarr_layout import RANK_PACK_BYTES, ArraySpec, pack_spec
from .staging import aligned

PACK_OWNER = 0
"""The rank that writes the pack, the metadata documents and the manifest."""


def describe_leaves(leaves: Sequence[ArrayLeaf], digests: Sequence[str | None] | None = None) -> list[list[Any]]:
    """What this rank holds, as JSON-able rows for the exchange between ranks.

    A row is ``[path, kind, dtype, stored, shape, itemsize, box, rank, digest]``:
    ``rank`` is the owner of a per-rank array (None for a shared one) and
    ``digest`` the xxh3-128 of a replicated array's bytes (None when not hashed).
    """
    hashes = digests if digests is not None else [None] * len(leaves)
    return [[leaf.path, leaf.kind, leaf.dtype, leaf.stored, list(leaf.shape), leaf.itemsize,
             None if leaf.box is None else leaf.box.to_json(), leaf.rank, hashed]
            for leaf, hashed in zip(leaves, hashes, strict=True)]


@dataclass
class Unit:
    """One distinct box of an array, the rank that writes it, and the chunks it writes."""

    path: str
    box: Box
    owner: int
    chunks: list[tuple[int, ...]] = field(default_factory=list)


@dataclass
class Plan:
    """The layout of a step, which rank writes each array's chunks, and the units of the ranks it was made for.

    ``writers`` and ``meshes`` are what the root manifest records of who wrote
    what (see ``_format/writers.py``); ``units`` are every rank's (a plan made
    from exchanged boxes) or one rank's own (:func:`~.share_plan.share_plan`).
    """

    arrays: dict[str, ArraySpec]
    pack: ArraySpec | None
    units: list[Unit]
    writers: dict[str, Any] = field(default_factory=dict)
    meshes: list[Mesh] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # rank 0's, recorded in the manifest

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


def _column(row: list[Any], index: int) -> Any:
    """A row's ``rank`` (7) or ``digest`` (8); None in rows made without them."""
    return row[index] if len(row) > index else None


def _check_replicated(shared: list[list[list[Any]]], wheres: Mapping[str, str]) -> None:
    """Refuse replicated arrays whose digests differ between ranks, naming them and the ranks."""
    differing = []
    for index, row in enumerate(shared[0]):
        digests = [_column(rows[index], 8) for rows in shared]
        if None in digests or len(set(digests)) == 1:
            continue
        others = [r for r, d in enumerate(digests) if d != digests[0]]
        where = wheres.get(row[0], row[0])
        differing.append(f"{where} (rank(s) {others} hold other bytes than rank 0)")
    if differing:
        shown = "; ".join(differing[:3]) + (f"; and {len(differing) - 3} more" if len(differing) > 3 else "")
        raise CheckpointError(f"{len(differing)} plain tensor(s) or array(s) differ between the ranks, but are saved "
                              f"once, as replicated state: {shown}. Make the ranks agree (e.g. broadcast from rank "
                              "0), shard them as DTensors, or wrap state that differs by rank in "
                              "trainio.checkpoint.PerRank(...) to save each rank's own")


def ranked(sharded: bool, largest_box: Box, itemsize: int, rank_pack_bytes: int, codec: str | None) -> bool:
    """Whether an array's chunks go in the packs of the ranks that write them: a sharded array whose shards are
    at most ``rank_pack_bytes``, uncompressed (so that a rank reading its shards opens a few big files, not one per
    array)."""
    return sharded and codec is None and math.prod(largest_box.shape) * itemsize <= rank_pack_bytes


def make_plan(per_rank: list[list[list[Any]]], chunk_bytes: int, pack_bytes: int, codec: str | None,
              wheres: Mapping[str, str] | None = None, *, rank_pack_bytes: int = RANK_PACK_BYTES) -> Plan:
    """The plan for the arrays ``per_rank[r]`` (from :func:`describe_leaves`) says rank ``r`` holds.

    ``wheres`` maps array paths to their places in the state, for messages.

    Raises:
        CheckpointError: the ranks' states differ in structure, a replicated
            array's bytes differ between ranks, or the ranks together do not
            hold every part of an array.
    """
    shared = [[row for row in rows if _column(row, 7) is None] for rows in per_rank]
    reference = shared[0]
    for rank, rows in enumerate(shared[1:], start=1):
        _rank_rows(rows, rank, reference)
    _check_replicated(shared, wheres or {})
    return _new_plan(per_rank, shared, chunk_bytes, pack_bytes, rank_pack_bytes, codec)


def _new_plan(per_rank: list[list[list[Any]]], shared: list[list[list[Any]]], chunk_bytes: int, pack_bytes: int,
              rank_pack_bytes: int, codec: str | None) -> Plan:
    reference = shared[0]
    arrays: dict[str, ArraySpec] = {}
    pack_end = 0
    units: list[Unit] = []
    holders: dict[tuple[str, Box], list[int]] = {}
    held: list[tuple[list[Any], dict[Box, list[int]], bool]] = []  # row, the ranks holding each box, packable
    for index, row in enumerate(reference):
        whole = Box.whole(tuple(row[4]))
        by_box: dict[Box, list[int]] = {}
        for rank, rows in enumerate(shared):  # one pass over the ranks: never every rank for every box
            place = rows[index][6]
            by_box.setdefault(whole if place is None else Box(tuple(place[0]), tuple(place[1])), []).append(rank)
        held.append((row, by_box, all(rows[index][6] is None for rows in shared)))
    paths = {row[0] for row in reference}
    for rank, rows in enumerate(per_rank):
        for row in rows:
            if _column(row, 7) is None:
                continue
            if row[7] != rank or row[0] in paths:
                raise CheckpointError(f"{row[0]}: rank {rank}'s per-rank array clashes with another array")
            paths.add(row[0])
            held.append((row, {Box.whole(tuple(row[4])): [rank]}, False))
    for row, by_box, packable in held:
        path, kind, dtype, stored, shape_list, itemsize = row[:6]
        shape = tuple(shape_list)
        nbytes = math.prod(shape) * itemsize
        if packable and nbytes <= pack_bytes:
            pack_end = aligned(pack_end)
            arrays[path] = ArraySpec(path, kind, dtype, stored, shape, grid_chunks(shape, itemsize, chunk_bytes, []),
                                     pack_end)
            pack_end += nbytes
            continue
        distinct = sorted((b for b in by_box if not b.empty), key=lambda b: b.offset)
        chunks = grid_chunks(shape, itemsize, chunk_bytes, distinct)
        arrays[path] = ArraySpec(path, kind, dtype, stored, shape, chunks, None, codec,
                                 ranked(len(distinct) > 1, max(distinct, key=lambda b: math.prod(b.shape)), itemsize,
                                        rank_pack_bytes, codec))
        for box in distinct:
            holders[(path, box)] = by_box[box]
            units.append(Unit(path, box, -1))
    pack = pack_spec(pack_end, chunk_bytes, codec) if any(s.packed is not None for s in arrays.values()) else None
    _assign_owners(units, holders, arrays, len(per_rank), pack_end)
    _assign_chunks(units, arrays)
    boxes: dict[str, list[list[Any]]] = {}
    for unit in units:
        boxes.setdefault(unit.path, []).append([list(unit.box.offset), list(unit.box.shape), unit.owner])
    writers = {path: {"rank": listed[0][2]} if len(listed) == 1 else {"boxes": listed} for path, listed in boxes.items()}
    return Plan(arrays, pack, units, writers)


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
