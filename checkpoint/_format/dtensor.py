"""DTensors: which part of the global tensor this rank holds, and where a restore must put it."""

from __future__ import annotations

import functools
from typing import Any

from trainio.storage import CheckpointError

from .boxes import Box
from .placement import Mesh, Placement


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor``."""
    if type(value).__name__ != "DTensor":
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(value, DTensor)


def dtensor_box(value: Any, where: str) -> Box | None:
    """The box of the global tensor this rank's shard of ``value`` covers; None when it is the whole tensor.

    Raises:
        CheckpointError: a placement other than ``Shard(dim)`` or ``Replicate()``
            (a pending reduction, or a strided shard) — the message names ``where``.
    """
    from torch.distributed.tensor import Replicate, Shard

    for placement in value.placements:
        if type(placement) not in (Shard, Replicate):
            raise CheckpointError(f"{where}: a DTensor placed as {placement} cannot be checkpointed; only "
                                  "Shard(dim) and Replicate() are (reduce a Partial tensor first)")
    mesh = value.device_mesh
    coordinate = mesh.get_coordinate()
    return _local_box(tuple(value.shape), mesh, tuple(value.placements), None if coordinate is None else
                      tuple(coordinate))


@functools.lru_cache(maxsize=4096)
def _local_box(shape: tuple[int, ...], device_mesh: Any, placements: tuple[Any, ...],
               coordinate: tuple[int, ...] | None) -> Box | None:
    """This rank's box (at ``coordinate`` of the mesh) of a tensor of ``shape`` placed so on ``device_mesh``: the
    same for every tensor of a model's layer stack, and torch's computation of it takes 0.1 ms (a restore asks for
    hundreds)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(shape, device_mesh, placements)
    box = Box(tuple(int(o) for o in offset), tuple(int(n) for n in local_shape))
    if any(n == 0 for n in box.shape):
        box = Box((0,) * len(shape), box.shape)
    return None if box == Box.whole(shape) else box


def placement_of(value: Any, meshes: dict[int, Mesh]) -> Placement:
    """``value``'s mesh and placements; ``meshes`` keeps each mesh described once (by object identity)."""
    from torch.distributed.tensor import Shard

    device_mesh = value.device_mesh
    mesh = meshes.get(id(device_mesh))
    if mesh is None:
        ranks = device_mesh.mesh
        mesh = meshes[id(device_mesh)] = Mesh(tuple(int(n) for n in ranks.shape),
                                              tuple(int(r) for r in ranks.flatten().tolist()))
    return Placement(mesh, tuple(p.dim if isinstance(p, Shard) else None for p in value.placements))


def local_shard(value: Any, where: str, meshes: dict[int, Mesh]) -> tuple[Any, Box | None, Placement]:
    """This rank's local tensor of ``value`` (sharing its memory), its box, and how the tensor is placed."""
    box = dtensor_box(value, where)
    local = value.to_local()
    if box is not None and tuple(local.shape) != box.shape:
        raise CheckpointError(f"{where}: the local shard has shape {list(local.shape)}, its placements say "
                              f"{list(box.shape)}")
    return local, box, placement_of(value, meshes)
