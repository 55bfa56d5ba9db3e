"""The state tree: what ``save`` accepts, and its JSON skeleton in the manifest.

A state is a nested dict / list / tuple whose leaves are torch tensors, numpy
arrays and scalars, JSON values (None, bool, int, float, str), objects with
``state_dict()``, and :class:`PerRank` sub-states. Flattening yields the
skeleton (JSON, no pickle) and the array leaves, each with its path in the
zarr group; building reverses it. A ``PerRank`` node holds one sub-tree per
rank; flattening on rank ``r`` gives it only rank ``r``'s (see ``per_rank``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainio.storage import CheckpointError

from .boxes import Box
from .dtensor import is_dtensor, local_shard
from .dtypes import numpy_dtype_name, stored_dtype, torch_dtype_name
from .names import node_name
from .nodes import Node, children
from .per_rank import PerRank, rank_path
from .placement import Mesh, Placement

_FLOAT_WORDS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


@dataclass(frozen=True)
class ArrayLeaf:
    """One array of the state: where it is, what it is, and the live object.

    Attributes:
        path: Its path in the zarr group ("model/layers.0.weight").
        where: Its place in the state, for messages (``state['model'][0]``).
        value: The torch tensor or numpy array itself (a DTensor's local shard).
        kind: ``"torch"``, ``"numpy"`` or ``"numpy_scalar"``.
        dtype: The true element type's name ("bfloat16").
        stored: The zarr data type it is written as ("uint16").
        shape: Its (global) shape.
        itemsize: Bytes per element.
        box: The part of the global array this process holds, or None for all of it.
        dtensor: Whether it is a DTensor's local shard.
        rank: The rank whose own value it is (inside a :class:`PerRank`), or
            None for state every rank shares.
        placement: A DTensor's mesh and placements (None for any other array).
    """

    path: str
    where: str
    value: Any
    kind: str
    dtype: str
    stored: str
    shape: tuple[int, ...]
    itemsize: int
    box: Box | None = None
    dtensor: bool = False
    rank: int | None = None
    placement: Placement | None = None

    @property
    def replicated(self) -> bool:
        """Whether every rank must hold the same bytes of it: a plain tensor or array outside a PerRank."""
        return not self.dtensor and self.rank is None

    @property
    def held_shape(self) -> tuple[int, ...]:
        """The shape of what this process holds: its box's, or the array's."""
        return self.shape if self.box is None else self.box.shape

    @property
    def nbytes(self) -> int:
        """Bytes of the elements this process holds."""
        return math.prod(self.held_shape) * self.itemsize


def _is_tensor(value: object) -> bool:
    module = type(value).__module__
    if not module.startswith("torch"):
        return False
    import torch

    return isinstance(value, torch.Tensor)


def _torch_strided() -> Any:
    import torch

    return torch.strided


def _has_state_dict(value: object) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def _child_where(where: str, key: str | int) -> str:
    return f"{where}[{key!r}]"


class _Flattener:
    def __init__(self, rank: int) -> None:
        self.arrays: list[ArrayLeaf] = []
        self.rank = rank
        self.owner: int | None = None  # set inside a PerRank
        self.meshes: dict[int, Mesh] = {}  # each device mesh described once

    def node(self, value: Any, path: str, where: str) -> Node:
        if isinstance(value, PerRank):
            return self.per_rank(value, path, where)
        if value is None or isinstance(value, (bool, str)):
            return {"t": "json", "value": value}
        if isinstance(value, int) and type(value) is int:
            return {"t": "json", "value": value}
        if type(value) is float:
            if math.isfinite(value):
                return {"t": "json", "value": value}
            return {"t": "float", "value": repr(value)}
        if isinstance(value, (np.ndarray, np.generic)):
            return self.array(value, path, where)
        if _is_tensor(value):
            return self.array(value, path, where)
        if isinstance(value, Mapping):
            return {"t": "dict", "items": self.items(value.items(), path, where)}
        if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
            kind = "list" if type(value) is list else "tuple"
            return {"t": kind, "items": [
                self.node(item, _join(path, str(i)), _child_where(where, i)) for i, item in enumerate(value)]}
        if isinstance(value, tuple):  # torch.Size and other tuple subclasses
            return {"t": "tuple", "items": [
                self.node(item, _join(path, str(i)), _child_where(where, i)) for i, item in enumerate(value)]}
        if _has_state_dict(value):
            kind = f"{type(value).__module__}.{type(value).__qualname__}"
            return {"t": "object", "type": kind, "state": self.node(value.state_dict(), path, where)}
        raise CheckpointError(
            f"{where}: cannot checkpoint a {type(value).__module__}.{type(value).__qualname__}; a state holds "
            "dicts, lists, tuples, tensors, numpy arrays, JSON values and objects with "
            "state_dict()/load_state_dict() (nothing is pickled)")

    def per_rank(self, value: PerRank[Any], path: str, where: str) -> Node:
        if self.owner is not None:
            raise CheckpointError(f"{where}: a PerRank inside a PerRank; wrap the outer value only")
        self.owner = self.rank
        try:
            return {"t": "per_rank", "ranks": [self.node(value.value, rank_path(path, self.rank), where)]}
        finally:
            self.owner = None

    def items(self, pairs: Any, path: str, where: str) -> list[list[Any]]:
        items: list[list[Any]] = []
        names: dict[str, object] = {}
        for key, value in pairs:
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise CheckpointError(f"{_child_where(where, key)}: dict keys must be str or int, not "
                                      f"{type(key).__name__}")
            name = node_name(key)
            if name in names:
                raise CheckpointError(f"{where}: keys {names[name]!r} and {key!r} would share the array name "
                                      f"{name!r}; rename one")
            names[name] = key
            items.append([key, self.node(value, _join(path, name), _child_where(where, key))])
        return items

    def array(self, value: Any, path: str, where: str) -> Node:
        if not path:
            raise CheckpointError(f"{where}: the state itself must be a dict, list or tuple, not an array")
        if isinstance(value, np.generic):
            kind, array = "numpy_scalar", np.asarray(value)
        elif isinstance(value, np.ndarray):
            kind, array = "numpy", value
        else:
            kind, array = "torch", value
        box = None
        dtensor = False
        placement = None
        if kind == "torch":
            dtype = torch_dtype_name(value.dtype)
            itemsize = value.element_size()
            shape = tuple(value.shape)
            if value.layout is not _torch_strided():
                raise CheckpointError(f"{where}: only strided (dense) tensors can be checkpointed, "
                                      f"not {value.layout}")
            if is_dtensor(value):
                array, box, placement = local_shard(value, where, self.meshes)
                dtensor = True
        else:
            name = numpy_dtype_name(array.dtype)
            if name is None:
                raise CheckpointError(f"{where}: numpy dtype {array.dtype} cannot be checkpointed; "
                                      "use a numeric or bool dtype")
            dtype, itemsize, shape = name, array.dtype.itemsize, tuple(array.shape)
        self.arrays.append(ArrayLeaf(path, where, array, kind, dtype, stored_dtype(dtype, itemsize), shape, itemsize,
                                     box, dtensor, self.owner, placement))
        return {"t": "array", "path": path}


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def flatten(state: Any, rank: int = 0) -> tuple[Node, list[ArrayLeaf]]:
    """The skeleton of ``state`` and its array leaves, in order, as rank ``rank`` holds them.

    Each :class:`PerRank` node holds this rank's sub-tree only, its arrays
    named with the rank; a multi-rank save gives it the other ranks' later.

    Raises:
        CheckpointError: a value cannot be checkpointed; the message names
            its place in the state.
    """
    flattener = _Flattener(rank)
    if not isinstance(state, (Mapping, list, tuple)) and not _has_state_dict(state):
        raise CheckpointError(f"state: must be a dict, list or tuple, not {type(state).__name__}")
    skeleton = flattener.node(state, "", "state")
    return skeleton, flattener.arrays


def array_paths(node: Node) -> Iterator[str]:
    """The zarr paths of every array under ``node``."""
    if node["t"] == "array":
        yield node["path"]
    for child in children(node):
        yield from array_paths(child)


def select(node: Node, keys: list[str]) -> Node:
    """The part of the skeleton under the given key paths ("model", "optim/state").

    Raises:
        CheckpointError: a key path is not in the state.
    """
    wanted: dict[str, list[str]] = {}
    for key in keys:
        head, _, rest = key.partition("/")
        wanted.setdefault(head, []).append(rest)
    if node["t"] == "object":
        return {**node, "state": select(node["state"], keys)}
    if node["t"] == "per_rank":
        return {**node, "ranks": [select(child, keys) for child in node["ranks"]]}
    if node["t"] == "dict":
        entries = [(str(k), k, child) for k, child in node["items"]]
    elif node["t"] in ("list", "tuple"):
        entries = [(str(i), i, child) for i, child in enumerate(node["items"])]
    else:
        raise CheckpointError(f"keys {keys!r}: the state has no containers at that depth")
    known = {name for name, _, _ in entries}
    missing = sorted(set(wanted) - known)
    if missing:
        raise CheckpointError(f"keys {missing!r} are not in the checkpoint; it holds {sorted(known)!r}")
    items: list[list[Any]] = []
    for name, key, child in entries:
        if name not in wanted:
            continue
        rests = wanted[name]
        items.append([key, child if "" in rests else select(child, rests)])
    return {"t": "dict", "items": items}


def build(node: Node, load_array: Callable[[str, Any], Any], into: Any = None) -> Any:
    """The state the skeleton describes; ``load_array(path, target)`` gives each array.

    ``into`` is an existing state of the same shape: its tensors and arrays are
    passed as targets to load in place, and its ``load_state_dict`` objects are
    given their restored state. Each per-rank node must hold one sub-tree (this
    rank's, from :func:`~trainio.checkpoint._format.per_rank.for_rank`): it becomes a
    :class:`PerRank`.
    """
    kind = node["t"]
    if kind == "json":
        return node["value"]
    if kind == "float":
        return _FLOAT_WORDS[node["value"]]
    if kind == "array":
        return load_array(node["path"], into)
    if kind == "object":
        current = into.state_dict() if _has_state_dict(into) else None
        state = build(node["state"], load_array, current)
        if _has_state_dict(into):
            into.load_state_dict(state)
            return into
        return state
    if kind == "per_rank":
        if len(node["ranks"]) != 1:
            raise CheckpointError(f"a per-rank node of {len(node['ranks'])} ranks was not cut to this rank's")
        return PerRank(build(node["ranks"][0], load_array, into.value if isinstance(into, PerRank) else into))
    if kind == "dict":
        result: dict[Any, Any] = {}
        for key, child in node["items"]:
            target = into.get(key) if isinstance(into, Mapping) else None
            result[key] = build(child, load_array, target)
        if isinstance(into, dict):
            into.update(result)
        return result
    items = [build(child, load_array, into[i] if _indexable(into, i) else None)
             for i, child in enumerate(node["items"])]
    if isinstance(into, list) and len(into) == len(items):
        into[:] = items
    return items if kind == "list" else tuple(items)


def _indexable(value: Any, i: int) -> bool:
    return isinstance(value, (list, tuple)) and i < len(value)
