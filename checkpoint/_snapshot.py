"""Snapshots: the state's arrays copied into a staging slot, the only part a save blocks on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._staging import Slot, aligned
from ._tree import ArrayLeaf, Node


@dataclass
class Snapshot:
    """A state frozen in host memory: its skeleton and each array's bytes.

    Attributes:
        skeleton: The state's skeleton.
        leaves: The arrays, in the state's order.
        views: Each array's bytes (C order, little-endian) in the slot.
        slot: The staging slot holding them; released once the snapshot is written.
    """

    skeleton: Node
    leaves: list[ArrayLeaf]
    views: list[memoryview]
    slot: Slot | None

    def release(self) -> None:
        """Hand the staging memory back; the views must not be used afterwards."""
        slot, self.slot = self.slot, None
        self.views = []
        if slot is not None:
            slot.release()


def take_snapshot(skeleton: Node, leaves: list[ArrayLeaf], slot: Slot) -> Snapshot:
    """Copy every array of ``leaves`` into ``slot`` and return the snapshot.

    GPU tensors are copied asynchronously into the (then pinned) slot and
    waited for once at the end. The caller may change its arrays as soon as
    this returns.
    """
    offsets: list[int] = []
    end = 0
    for leaf in leaves:
        end = aligned(end)
        offsets.append(end)
        end += leaf.nbytes
    on_gpu = any(leaf.kind == "torch" and leaf.value.device.type == "cuda" for leaf in leaves)
    slot.reserve(max(end, 1), pinned=on_gpu)
    views: list[memoryview] = []
    memory = memoryview(slot.array)
    for leaf, offset in zip(leaves, offsets, strict=True):
        views.append(memory[offset:offset + leaf.nbytes])
    if any(leaf.kind == "torch" for leaf in leaves):
        _copy_with_torch(leaves, offsets, slot)
    else:
        for leaf, offset in zip(leaves, offsets, strict=True):
            _copy_numpy(leaf, slot.array[offset:offset + leaf.nbytes])
    return Snapshot(skeleton, leaves, views, slot)


def _copy_with_torch(leaves: list[ArrayLeaf], offsets: list[int], slot: Slot) -> None:
    import torch

    from ._dtypes import torch_dtype

    buffer = slot.buffer if isinstance(slot.buffer, torch.Tensor) else torch.from_numpy(slot.array)
    devices: set[Any] = set()
    with torch.no_grad():
        for leaf, offset in zip(leaves, offsets, strict=True):
            if leaf.kind != "torch":
                _copy_numpy(leaf, slot.array[offset:offset + leaf.nbytes])
                continue
            source = leaf.value
            target = buffer[offset:offset + leaf.nbytes].view(torch_dtype(leaf.dtype)).view(leaf.shape)
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
