"""Snapshots: the state's arrays copied into a staging slot, the only part a save blocks on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._format.nodes import Node
from .._format.state_tree import ArrayLeaf
from .staging import Slot, StagingPool, aligned


@dataclass
class Snapshot:
    """A state frozen in host memory: its skeleton and each array's bytes.

    The packed arrays come first in the slot, back to back, so the step's pack
    is one range of it.

    Attributes:
        skeleton: The state's skeleton.
        leaves: The arrays, in the state's order.
        views: Each array's bytes (C order, little-endian) in the slot.
        offsets: Each array's offset in the slot.
        packed: The paths of the arrays in the pack.
        pack: The packed arrays' bytes (the slot's first bytes).
        slot: The staging slot holding them; released once the snapshot is written.
    """

    skeleton: Node
    leaves: list[ArrayLeaf]
    views: list[memoryview]
    offsets: list[int]
    packed: frozenset[str]
    pack: memoryview
    slot: Slot | None

    def is_packed(self, leaf: ArrayLeaf) -> bool:
        """Whether ``leaf`` lives in the pack."""
        return leaf.path in self.packed

    def release(self) -> None:
        """Hand the staging memory back; the views must not be used afterwards."""
        slot, self.slot = self.slot, None
        self.views = []
        self.pack = memoryview(b"")
        if slot is not None:
            slot.release()


def is_packable(leaf: ArrayLeaf, pack_bytes: int) -> bool:
    """Whether ``leaf`` belongs in a step's pack: small, and held whole."""
    return leaf.box is None and leaf.nbytes <= pack_bytes


def snapshot_into(pool: StagingPool, skeleton: Node, leaves: list[ArrayLeaf], pack_bytes: int,
                  packed: frozenset[str]) -> Snapshot:
    """:func:`take_snapshot` into a slot of ``pool`` (waiting for a free one), the slot given back if it fails."""
    slot = pool.acquire()
    try:
        return take_snapshot(skeleton, leaves, slot, pack_bytes, packed)
    except BaseException:
        slot.release()
        raise


def staging_need(leaves: list[ArrayLeaf]) -> tuple[int, bool]:
    """(bytes, pinned): the staging a snapshot of all of ``leaves`` takes at most, pinned when any is on a GPU."""
    return sum(aligned(leaf.nbytes) for leaf in leaves), any(leaf.kind == "torch" and leaf.value.device.type == "cuda" for leaf in leaves)


def take_snapshot(skeleton: Node, leaves: list[ArrayLeaf], slot: Slot, pack_bytes: int = 0,
                  packed: frozenset[str] | None = None) -> Snapshot:
    """Copy every array of ``leaves`` into ``slot`` and return the snapshot.

    The pack holds the arrays named in ``packed``, by default those held whole
    and of at most ``pack_bytes``.

    GPU tensors are copied asynchronously into the (then pinned) slot and
    waited for once at the end. The caller may change its arrays as soon as
    this returns.
    """
    offsets: list[int] = [0] * len(leaves)
    end = 0
    if packed is None:
        packed = frozenset(leaf.path for leaf in leaves if is_packable(leaf, pack_bytes))
    small = [i for i, leaf in enumerate(leaves) if leaf.path in packed]
    for i in small:
        end = aligned(end)
        offsets[i] = end
        end += leaves[i].nbytes
    pack_end = end
    for i, leaf in enumerate(leaves):
        if leaf.path not in packed:
            end = aligned(end)
            offsets[i] = end
            end += leaf.nbytes
    on_gpu = any(leaf.kind == "torch" and leaf.value.device.type == "cuda" for leaf in leaves)
    slot.reserve(max(end, 1), pinned=on_gpu)
    views: list[memoryview] = []
    memory = slot.array.data
    for leaf, offset in zip(leaves, offsets, strict=True):
        views.append(memory[offset:offset + leaf.nbytes])
    if any(leaf.kind == "torch" for leaf in leaves):
        _copy_with_torch(leaves, offsets, slot)
    else:
        for leaf, offset in zip(leaves, offsets, strict=True):
            _copy_numpy(leaf, slot.array[offset:offset + leaf.nbytes])
    return Snapshot(skeleton, leaves, views, offsets, packed, memory[:pack_end], slot)


def _copy_with_torch(leaves: list[ArrayLeaf], offsets: list[int], slot: Slot) -> None:
    import torch

    from .._format.dtypes import torch_dtype

    buffer = slot.buffer if isinstance(slot.buffer, torch.Tensor) else torch.from_numpy(slot.array)
    devices: set[Any] = set()
    with torch.no_grad():
        for leaf, offset in zip(leaves, offsets, strict=True):
            if leaf.kind != "torch":
                _copy_numpy(leaf, slot.array[offset:offset + leaf.nbytes])
                continue
            source = leaf.value
            target = buffer[offset:offset + leaf.nbytes].view(torch_dtype(leaf.dtype)).view(leaf.held_shape)
            if source.device.type == "cuda":
                devices.add(source.device)
                target.copy_(source.detach(), non_blocking=True)
            else:
                target.copy_(source.detach())
    for device in devices:
        torch.cuda.synchronize(device)


def _copy_numpy(leaf: ArrayLeaf, target: np.ndarray[Any, Any]) -> None:
    source = np.asarray(leaf.value)
    np.copyto(target.view(source.dtype.newbyteorder("<")).reshape(leaf.shape), source, casting="equiv")
