"""What a restore fills: host memory for each saved array (the target's own where it fits), the dtype check, and
the targets filled in place at the end."""

from __future__ import annotations

from typing import Any

import numpy as np

from trainio.storage import CheckpointError

from .._format.boxes import Box
from .._format.dtensor import dtensor_box, is_dtensor
from .._format.dtypes import storage_numpy_dtype, torch_dtype
from .._format.nodes import Node
from .._format.per_rank import PerRank
from .._format.zarr_layout import ArraySpec


def host_array(spec: ArraySpec, target: Any) -> tuple[Any, np.ndarray[Any, Any]]:
    """A host array to read ``spec`` into (``target`` itself when it fits) and its bytes."""
    if spec.kind == "torch":
        import torch

        torch_type = torch_dtype(spec.dtype)
        if (isinstance(target, torch.Tensor) and target.device.type == "cpu" and target.dtype == torch_type
                and tuple(target.shape) == spec.shape and target.is_contiguous()):
            tensor = target
        else:
            tensor = torch.empty(spec.shape, dtype=torch_type)
        flat = tensor.detach().reshape(-1)
        raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
        return tensor, raw
    dtype = storage_numpy_dtype(spec.dtype)
    if (isinstance(target, np.ndarray) and target.dtype == dtype and target.shape == spec.shape
            and target.flags.c_contiguous and target.flags.writeable):
        array = target
    else:
        array = np.empty(spec.shape, dtype)
    return array, array.reshape(-1).view(np.uint8)


class Casting:
    """``into`` whose tensors and arrays may have other dtypes than the saved ones: the values are converted."""

    def __init__(self, into: Any) -> None:
        self.into = into


def check_dtype(spec: ArraySpec, target: Any, where: str) -> None:
    """Raise :class:`CheckpointError` if ``target`` (a tensor or array) has another dtype than ``spec``'s."""
    found = getattr(target, "dtype", None)
    if found is None or spec.kind == "numpy_scalar":
        return
    got = str(found).removeprefix("torch.")
    if got != spec.dtype:
        raise CheckpointError(f"{where}: the checkpoint holds {spec.dtype}, the target is {got}: restoring would "
                              "convert the values; pass restore(..., cast=True) if that is meant")


def finish_array(spec: ArraySpec, array: Any, target: Any, where: str) -> Any:
    """The value restore returns for an array: ``target`` filled in place when one was given."""
    if spec.kind == "numpy_scalar":
        return array[()]
    if target is None or target is array:
        return array
    if is_dtensor(target):
        return fill_shard(spec, array, target, where)
    shape = tuple(target.shape) if hasattr(target, "shape") else None
    if shape != spec.shape:
        raise CheckpointError(f"{where}: the checkpoint holds shape {list(spec.shape)}, the target has "
                              f"{list(shape) if shape is not None else type(target).__name__}")
    if spec.kind == "torch" and not isinstance(target, np.ndarray):
        import torch

        with torch.no_grad():
            target.copy_(array, non_blocking=False)
        return target
    np.copyto(target, array, casting="same_kind")
    return target


def fill_shard(spec: ArraySpec, array: Any, target: Any, where: str) -> Any:
    """Copy this rank's shard of a whole restored ``array`` into the DTensor ``target``."""
    import torch

    if tuple(target.shape) != spec.shape:
        raise CheckpointError(f"{where}: the checkpoint holds shape {list(spec.shape)}, the target DTensor has "
                              f"{list(target.shape)}")
    box = dtensor_box(target, where) or Box.whole(spec.shape)
    with torch.no_grad():
        target.to_local().copy_(array[box.relative_to(Box.whole(spec.shape))])
    return target


def collect_targets(node: Node, into: Any, found: dict[str, Any]) -> None:
    """Map each array path of ``node`` to the object at the same place in ``into``."""
    if into is None:
        return
    kind = node["t"]
    if kind == "array":
        found[node["path"]] = into
    elif kind == "object":
        if callable(getattr(into, "state_dict", None)):
            collect_targets(node["state"], into.state_dict(), found)
    elif kind == "dict" and hasattr(into, "get"):
        for key, child in node["items"]:
            collect_targets(child, into.get(key), found)
    elif kind in ("list", "tuple") and isinstance(into, (list, tuple)):
        for child, value in zip(node["items"], into, strict=False):
            collect_targets(child, value, found)
    elif kind == "per_rank":  # cut to this rank's sub-tree by for_rank
        collect_targets(node["ranks"][0], into.value if isinstance(into, PerRank) else into, found)
