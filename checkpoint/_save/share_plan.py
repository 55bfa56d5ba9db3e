"""One rank's share of a save, from a description every rank holds alike: no rank sends its boxes to another.

When every rank describes the shared arrays the same way (paths, types,
shapes, and for a DTensor its mesh and placements, not its own box), every
box of every rank follows from that description (see ``placement.py``), so
each rank makes its own share of the plan alone: every array's chunk grid
(aligned to all boxes), and which of its own boxes it writes. Rank 0 also
gets the other ranks' :class:`~trainio.checkpoint.PerRank` arrays (it writes
their metadata). The cost is linear in the arrays (numpy over each mesh's
coordinates), whatever the rank count.

Who writes a box: among the ranks holding it (the mesh coordinates that
differ from each other only along replicating mesh dimensions, in C order),
the one at position ``(a + p) mod h``, where ``a`` is the array's number in
the description, ``p`` the box's piece number (C order over the sharding
mesh dimensions) and ``h`` the number of holders; a plain replicated array is
held by every rank, ``0 .. world-1``. Replicas are so spread over their
holders. A rank's :class:`PerRank` arrays are its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from trainio.storage import CheckpointError

from .._format.boxes import Box, cell_chunks, chunk_indices, grid_chunks
from .._format.per_rank import json_digest
from .._format.placement import Mesh, Placement, grid_steps, mesh_boxes, writer_of
from .._format.state_tree import ArrayLeaf
from .._format.zarr_layout import RANK_PACK_BYTES, ArraySpec, pack_spec
from .plan import Plan, Unit, ranked
from .staging import aligned


@dataclass(frozen=True)
class Layout:
    """The shared arrays as every rank describes them alike, and this rank's PerRank arrays.

    ``rows`` are ``[path, kind, dtype, stored, shape, itemsize, placed]``,
    ``placed`` None (the whole array on every rank) or ``[mesh, shards]``, an
    index into ``meshes`` and the tensor dimension each mesh dimension shards
    (None: replicates). ``own`` are this rank's PerRank arrays, as
    ``[path, kind, dtype, stored, shape, itemsize]``.
    """

    rows: list[list[Any]]
    meshes: list[Mesh]
    own: list[list[Any]]

    @cached_property
    def digest(self) -> str:
        """xxh3-128 of the shared part: equal on every rank exactly when the ranks may plan alone."""
        return json_digest([self.rows, [mesh.to_json() for mesh in self.meshes]])


def describe_layout(leaves: Sequence[ArrayLeaf], rank: int, world: int) -> Layout | None:
    """This rank's description of its state for :func:`share_plan`; None where the rule cannot place it.

    That is a DTensor on a mesh that is not the whole job (each data-parallel
    replica with its own tensor-parallel mesh, say), or whose local shard is
    not where the rule puts it: the ranks then exchange their boxes instead.
    """
    rows: list[list[Any]] = []
    meshes: dict[int, tuple[int, int]] = {}  # by id: the mesh's number here, and this rank's coordinate in it
    listed: list[Mesh] = []
    own: list[list[Any]] = []
    everyone = list(range(world))
    for leaf in leaves:
        row = [leaf.path, leaf.kind, leaf.dtype, leaf.stored, list(leaf.shape), leaf.itemsize]
        if leaf.rank is not None:
            own.append(row)
            continue
        placed = None
        placement = leaf.placement
        if placement is not None:
            known = meshes.get(id(placement.mesh))
            if known is None:
                if sorted(placement.mesh.ranks) != everyone:
                    return None
                known = meshes[id(placement.mesh)] = (len(meshes), placement.mesh.ranks.index(rank))
                listed.append(placement.mesh)
            rule = mesh_boxes(leaf.shape, placement, only=known[1]).box(0)
            if rule != (leaf.box or Box.whole(leaf.shape)) and not (rule.empty and leaf.box is not None
                                                                    and leaf.box.empty):
                return None
            placed = [known[0], list(placement.shards)]
        rows.append([*row, placed])
    return Layout(rows, listed, own)


def share_plan(layout: Layout, per_rank: Sequence[Sequence[list[Any]]], rank: int, world: int,
               chunk_bytes: int, pack_bytes: int, codec: str | None, *, rank_pack_bytes: int = RANK_PACK_BYTES
               ) -> Plan:
    """Rank ``rank``'s plan: every array's layout, and the units ``rank`` writes.

    ``layout`` is what every rank described alike (:func:`describe_layout`).
    ``per_rank[r]`` are rank ``r``'s PerRank rows (:attr:`Layout.own`), as far
    as this rank knows them (rank 0 knows all).

    Raises:
        CheckpointError: two ranks' PerRank arrays clash with another array.
    """
    arrays: dict[str, ArraySpec] = {}
    writers: dict[str, Any] = {}
    units: list[Unit] = []
    pack_end = 0
    positions = [mesh.ranks.index(rank) for mesh in layout.meshes]
    for number, row in enumerate(layout.rows):
        path, kind, dtype, stored, shape_list, itemsize, placed = row
        shape = tuple(shape_list)
        placement = None if placed is None else Placement(layout.meshes[placed[0]], tuple(placed[1]))
        whole = placement is None or all(d is None or placement.mesh.shape[i] == 1
                                          for i, d in enumerate(placement.shards))
        if whole and math.prod(shape) * itemsize <= pack_bytes:
            pack_end = aligned(pack_end)
            arrays[path] = ArraySpec(path, kind, dtype, stored, shape, grid_chunks(shape, itemsize, chunk_bytes, []),
                                     pack_end)
            pack_end += math.prod(shape) * itemsize
            continue
        if placement is None:
            chunks = grid_chunks(shape, itemsize, chunk_bytes, [])
            arrays[path] = ArraySpec(path, kind, dtype, stored, shape, chunks, None, codec)
            writers[path] = {"rank": number % world}
            if (number % world) == rank:
                units.append(Unit(path, Box.whole(shape), rank, list(chunk_indices(Box.whole(shape), chunks))))
            continue
        chunks = cell_chunks(shape, itemsize, chunk_bytes, grid_steps(shape, placement))
        arrays[path] = ArraySpec(path, kind, dtype, stored, shape, chunks, None, codec,
                                 ranked(not whole, mesh_boxes(shape, placement, only=0).box(0), itemsize,
                                        rank_pack_bytes, codec))
        writers[path] = {"mesh": placed[0], "shards": placed[1], "turn": number}
        mine = positions[placed[0]]
        box = mesh_boxes(shape, placement, only=mine).box(0)
        if not box.empty and writer_of(placement, mine, number) == rank:
            units.append(Unit(path, box, rank, list(chunk_indices(box, chunks))))
    for owner, rows in enumerate(per_rank):
        for path, kind, dtype, stored, shape_list, itemsize in rows:
            shape = tuple(shape_list)
            if path in arrays:
                raise CheckpointError(f"{path}: rank {owner}'s per-rank array clashes with another array")
            chunks = grid_chunks(shape, itemsize, chunk_bytes, [])
            arrays[path] = ArraySpec(path, kind, dtype, stored, shape, chunks, None, codec)
            writers[path] = {"rank": owner}
            if owner == rank:
                units.append(Unit(path, Box.whole(shape), rank, list(chunk_indices(Box.whole(shape), chunks))))
    pack = pack_spec(pack_end, chunk_bytes, codec) if any(s.packed is not None for s in arrays.values()) else None
    return Plan(arrays, pack, units, writers, layout.meshes)
