"""Which rank wrote each chunk of an array (version 3), so a reader opens only the part manifests it needs.

A version-3 root manifest records, per array that is not packed, one of:

- ``{"rank": r}``: rank ``r`` wrote every chunk;
- ``{"mesh": m, "shards": [...], "turn": t}``: a DTensor placed by rule
  (``placement.py``) over root mesh ``m``; the chunk at grid point ``p`` lies in
  the box of the mesh coordinate whose pieces contain ``p``, and that box's
  writer is :func:`~.placement.writer_of` with ``turn`` ``t``;
- ``{"boxes": [[offset, shape, rank], ...]}``: the boxes and their writers,
  listed (the plan was made by exchanging boxes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .boxes import Box
from .placement import Mesh, Placement, ravel, writer_of


def _coordinate(shape: tuple[int, ...], placement: Placement, point: tuple[int, ...]) -> int:
    """The flat mesh coordinate (replicating dimensions at 0) whose box holds ``point``."""
    mesh = placement.mesh.shape
    where = [0] * len(mesh)
    for dim, n in enumerate(shape):
        current, offset = n, 0
        for i, sharded in enumerate(placement.shards):
            if sharded != dim:
                continue
            full = -(-current // mesh[i])
            piece = min((point[dim] - offset) // full, mesh[i] - 1) if full else 0
            where[i] = piece
            start = min(current, full * piece)
            offset += start
            current = max(0, min(current, full * piece + full) - start)
    return ravel(where, mesh)


def chunk_writer(writers: dict[str, Any], meshes: list[Mesh], shape: tuple[int, ...],
                 chunks: tuple[int, ...]) -> Callable[[tuple[int, ...]], int]:
    """A function from a chunk's grid index to the rank that wrote it, for one array's ``writers`` entry."""
    if "rank" in writers:
        rank = int(writers["rank"])
        return lambda index: rank
    if "mesh" in writers:
        placement = Placement(meshes[writers["mesh"]], tuple(writers["shards"]))
        turn = int(writers["turn"])
        return lambda index: writer_of(placement, _coordinate(shape, placement, _origin(index, chunks)), turn)
    boxes = [(Box(tuple(o), tuple(s)), int(r)) for o, s, r in writers["boxes"]]

    def listed(index: tuple[int, ...]) -> int:
        point = Box(_origin(index, chunks), (1,) * len(chunks))
        for box, rank in boxes:
            if box.intersect(point) is not None:
                return rank
        raise KeyError(index)

    return listed


def _origin(index: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(i * c for i, c in zip(index, chunks, strict=True))
