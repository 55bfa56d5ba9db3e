"""Where every rank's box of a DTensor lies, from its mesh and placements alone (no exchange between ranks).

A DTensor placed by ``Shard(dim)`` and ``Replicate()`` over a device mesh is
cut the way ``torch.chunk`` cuts: along each mesh dimension in order, a
``Shard(d)`` splits the current extent ``n`` of tensor dimension ``d`` into
``ceil(n / m)``-long pieces over the ``m`` coordinates of that mesh dimension
(the last pieces shorter or empty); a ``Replicate()`` copies it. So every
rank can compute every other rank's box, uneven and many-dimensional meshes
included, and a save need not send boxes between ranks. :func:`mesh_boxes`
computes them for every coordinate at once; the rank's own box, as torch
reports it, is checked against it when the state is flattened.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .boxes import Box


@dataclass(frozen=True)
class Mesh:
    """A device mesh: its shape, and the global rank at each coordinate (C order)."""

    shape: tuple[int, ...]
    ranks: tuple[int, ...]

    def to_json(self) -> list[list[int]]:
        """``[shape, ranks]``."""
        return [list(self.shape), list(self.ranks)]


@dataclass(frozen=True)
class Placement:
    """How a DTensor lies over a mesh: per mesh dimension, the tensor dimension it shards, or None (replicated)."""

    mesh: Mesh
    shards: tuple[int | None, ...]


@dataclass(frozen=True)
class MeshBoxes:
    """Mesh coordinates' boxes of one array (C order of coordinates): ``(coordinates, ndim)`` offsets and lengths.

    An empty box has offset 0.
    """

    offsets: np.ndarray
    lengths: np.ndarray

    def box(self, coordinate: int) -> Box:
        """The box of the ``coordinate``-th row."""
        return Box(tuple(int(o) for o in self.offsets[coordinate]), tuple(int(n) for n in self.lengths[coordinate]))


def mesh_boxes(shape: tuple[int, ...], placement: Placement, only: int | None = None) -> MeshBoxes:
    """The box of ``shape`` that every coordinate of ``placement``'s mesh holds (see the module's rule).

    With ``only``, just that coordinate's (flat, C order): one row.
    """
    mesh = placement.mesh.shape
    flat = np.arange(int(np.prod(mesh, dtype=np.int64)), dtype=np.int64) if only is None \
        else np.asarray([only], dtype=np.int64)
    coordinates = np.unravel_index(flat, mesh) if mesh else ()
    offsets = np.zeros((flat.size, len(shape)), dtype=np.int64)
    lengths = np.tile(np.asarray(shape, dtype=np.int64), (flat.size, 1))
    for mesh_dim, dim in enumerate(placement.shards):
        if dim is None:
            continue
        size = mesh[mesh_dim]
        where = coordinates[mesh_dim]
        current = lengths[:, dim]
        full = -(-current // size)
        start = np.minimum(current, full * where)
        lengths[:, dim] = np.maximum(0, np.minimum(current, full * where + full) - start)
        offsets[:, dim] += start
    offsets[(lengths == 0).any(axis=1)] = 0
    return MeshBoxes(offsets, lengths)


def grid_steps(shape: tuple[int, ...], placement: Placement) -> list[int]:
    """Per dimension, the gcd of every box boundary strictly inside the array (0 where there is none).

    Each dimension is cut only by the mesh dimensions that shard it, so it is
    computed over their coordinates alone (linear in the mesh's size at most).
    """
    steps = []
    for dim, n in enumerate(shape):
        cutting = tuple(placement.mesh.shape[i] for i, d in enumerate(placement.shards) if d == dim)
        if not cutting or n == 0:
            steps.append(0)
            continue
        along = mesh_boxes((n,), Placement(Mesh(cutting, ()), (0,) * len(cutting)))
        full = along.lengths[:, 0] > 0
        edges = np.concatenate((along.offsets[full, 0], along.offsets[full, 0] + along.lengths[full, 0]))
        steps.append(int(np.gcd.reduce(edges[(edges > 0) & (edges < n)], initial=0)))
    return steps


def writer_of(placement: Placement, coordinate: int, turn: int) -> int:
    """The global rank that writes the box mesh coordinate ``coordinate`` holds (see share_plan.py's rule).

    The box's holders are the coordinates that differ from it only along
    replicating mesh dimensions, in C order; the writer is the one at
    position ``(turn + piece) mod holders``, ``piece`` the box's number in C
    order over the sharding mesh dimensions.
    """
    mesh = placement.mesh.shape
    where = unravel(coordinate, mesh)
    sharding = [i for i, d in enumerate(placement.shards) if d is not None]
    replicating = [i for i, d in enumerate(placement.shards) if d is None]
    piece = ravel([where[i] for i in sharding], [mesh[i] for i in sharding])
    holders = 1
    for i in replicating:
        holders *= mesh[i]
    pick = unravel((turn + piece) % holders, [mesh[i] for i in replicating])
    for i, value in zip(replicating, pick, strict=True):
        where[i] = value
    return placement.mesh.ranks[ravel(where, mesh)]


def ravel(where: list[int], shape: tuple[int, ...] | list[int]) -> int:
    """The flat C-order index of coordinate ``where`` in a grid of ``shape`` (0 for an empty shape)."""
    flat = 0
    for i, n in zip(where, shape, strict=True):
        flat = flat * n + i
    return flat


def unravel(flat: int, shape: tuple[int, ...] | list[int]) -> list[int]:
    """The coordinate of C-order index ``flat`` in a grid of ``shape``."""
    where = [0] * len(shape)
    for dim in range(len(shape) - 1, -1, -1):
        flat, where[dim] = divmod(flat, shape[dim])
    return where
