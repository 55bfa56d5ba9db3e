"""State that differs by rank: :class:`PerRank`, and the check that every other value is the same on every rank.

A multi-rank save writes everything outside a ``PerRank`` once: a plain tensor
or array (not a DTensor) and every JSON leaf of the skeleton must be the same
on every rank. ``save()`` hashes each such tensor's live bytes (xxh3-128) and
the skeleton's shared part, the ranks exchange those digests with the plan's
rows, and a difference is refused naming its place and the ranks.

A ``PerRank(value)`` is stored once per rank: its skeleton node holds one
sub-tree per rank (``{"t": "per_rank", "ranks": [node_0, node_1, ...]}``) and
its arrays are named with the rank (``rng/rank-1/...``), each written by its
own rank. A restore with the same world size gives rank ``r`` its own value;
with another world size it is refused (see :func:`for_rank`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from trainio.storage import CheckpointError, Hasher, digest

from .nodes import Node, children

if TYPE_CHECKING:
    from .state_tree import ArrayLeaf

T = TypeVar("T")


_DEVICE_PIECE_BYTES = 64 << 20
"""Device tensors are hashed through host copies of at most this many bytes."""


@dataclass(frozen=True, slots=True)
class PerRank(Generic[T]):
    """A sub-state that differs by rank (RNG states, per-rank counters): saved for each rank, restored to each.

    Everything else a multi-rank save holds outside a DTensor is replicated
    state: it must be the same on every rank, and a save where it differs is
    refused, naming the place and the ranks. Wrap what legitimately differs::

        manager.save(step, {"model": model, "rng": PerRank({"torch": torch.get_rng_state(),
                                                            "numpy": rng.bit_generator.state,
                                                            "python": random.getstate()})})

    ``value`` may be any checkpointable sub-state (tensors, arrays, JSON
    values, nested dicts, lists and tuples, objects with ``state_dict()``), but
    not another ``PerRank``. Restore returns ``PerRank(this rank's value)``;
    with ``into=``, the tensors of ``into``'s ``PerRank`` (or of a bare value at
    that place) are filled in place. A step holding ``PerRank`` values restores
    only with the world size it was saved with: otherwise there is no right
    owner for each rank's value, and the restore is refused naming the value
    (restore the rest with ``keys=``). A single-process save is a world of one.

    Attributes:
        value: This rank's own sub-state.
    """

    value: T


def rank_path(path: str, rank: int) -> str:
    """The zarr path of rank ``rank``'s sub-tree of the per-rank value at ``path``."""
    name = f"rank-{rank}"
    return f"{path}/{name}" if path else name


def _shared(node: Node, own: list[Node]) -> Node:
    """``node`` with each per-rank node's sub-trees taken out into ``own`` (skeleton order)."""
    kind = node["t"]
    if kind == "per_rank":
        own.extend(node["ranks"])
        return {"t": "per_rank", "ranks": []}
    if kind == "object":
        return {**node, "state": _shared(node["state"], own)}
    if kind == "dict":
        return {"t": "dict", "items": [[key, _shared(child, own)] for key, child in node["items"]]}
    if kind in ("list", "tuple"):
        return {"t": kind, "items": [_shared(child, own) for child in node["items"]]}
    return node


def split(skeleton: Node) -> tuple[Node, str, list[Node]]:
    """The part of a rank's skeleton every rank must share, its digest, and this rank's per-rank sub-trees.

    ``skeleton`` is what :func:`~trainio.checkpoint._format.state_tree.flatten` gave this
    rank: each per-rank node holds only this rank's sub-tree.
    """
    own: list[Node] = []
    shared = _shared(skeleton, own)
    return shared, json_digest(shared), own


def json_digest(value: Any) -> str:
    """The xxh3-128 of ``value`` as compact JSON: equal on every rank that holds an equal value."""
    return digest(json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8"))


def _per_rank_nodes(node: Node) -> Iterator[Node]:
    if node["t"] == "per_rank":
        yield node
        return
    for child in children(node):
        yield from _per_rank_nodes(child)


def fill(skeleton: Node, own_by_rank: list[list[Node]]) -> None:
    """Give each per-rank node of ``skeleton`` every rank's sub-tree, in rank order (in place).

    ``own_by_rank[r]`` is rank ``r``'s list from :func:`split`; the ranks'
    shared skeletons are equal, so every list is as long as there are
    per-rank nodes.
    """
    for index, node in enumerate(_per_rank_nodes(skeleton)):
        node["ranks"] = [own[index] for own in own_by_rank]


def for_rank(node: Node, rank: int, world: int, saved_world: int, where: str = "state") -> Node:
    """``node`` with each per-rank node cut down to rank ``rank``'s sub-tree.

    Raises:
        CheckpointError: ``node`` holds per-rank values and ``world`` is not
            the world size they were saved with. Handing rank r the value of
            rank r would silently drop some ranks' values (or leave new ranks
            none), and RNG streams or counters belong to a rank's place in the
            job, which changes with the world size: a loud refusal is safer.
    """
    kind = node["t"]
    if kind == "per_rank":
        if world != saved_world or len(node["ranks"]) != saved_world:
            raise CheckpointError(
                f"{where}: a PerRank value saved by {saved_world} rank(s) cannot be restored on {world}: each rank's "
                "value belongs to its place in the saving job; restore the other sub-trees with keys=[...] and "
                "set this one afresh, or restore with the same world size")
        return {"t": "per_rank", "ranks": [node["ranks"][rank]]}
    if kind == "object":
        return {**node, "state": for_rank(node["state"], rank, world, saved_world, where)}
    if kind == "dict":
        return {"t": "dict", "items": [[key, for_rank(child, rank, world, saved_world, f"{where}[{key!r}]")]
                                       for key, child in node["items"]]}
    if kind in ("list", "tuple"):
        return {"t": kind, "items": [for_rank(child, rank, world, saved_world, f"{where}[{i}]")
                                     for i, child in enumerate(node["items"])]}
    return node


def _brief(node: Node) -> str:
    kind = node["t"]
    if kind in ("json", "float"):
        text = json.dumps(node["value"]) if kind == "json" else node["value"]
        return text if len(text) <= 40 else text[:37] + "..."
    if kind == "object":
        return f"an object of type {node['type']}"
    if kind == "dict":
        keys = [key for key, _ in node["items"]]
        return f"a dict with keys {keys[:5]!r}{'...' if len(keys) > 5 else ''}"
    if kind in ("list", "tuple"):
        return f"a {kind} of {len(node['items'])}"
    return f"a {kind}"


def first_difference(a: Node, b: Node, where: str = "state") -> tuple[str, str, str] | None:
    """The first place where two shared skeletons differ, and what each holds there; None if they are equal."""
    kind = a["t"]
    if kind != b["t"] or kind == "object" and a["type"] != b["type"]:
        return where, _brief(a), _brief(b)
    if kind in ("json", "float"):
        same = json.dumps(a["value"]) == json.dumps(b["value"])
        return None if same else (where, _brief(a), _brief(b))
    if kind == "array":
        return None if a["path"] == b["path"] else (where, _brief(a), _brief(b))
    if kind == "object":
        return first_difference(a["state"], b["state"], f"{where}.state_dict()")
    if kind == "dict":
        if [k for k, _ in a["items"]] != [k for k, _ in b["items"]]:
            return where, _brief(a), _brief(b)
        for (key, x), (_, y) in zip(a["items"], b["items"], strict=True):
            found = first_difference(x, y, f"{where}[{key!r}]")
            if found is not None:
                return found
        return None
    if kind in ("list", "tuple"):
        if len(a["items"]) != len(b["items"]):
            return where, _brief(a), _brief(b)
        for i, (x, y) in enumerate(zip(a["items"], b["items"], strict=True)):
            found = first_difference(x, y, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def skeleton_mismatch(skeletons: list[Node]) -> CheckpointError:
    """The error for ranks whose shared skeletons differ from rank 0's, naming the first place and the ranks."""
    places: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for rank, skeleton in enumerate(skeletons[1:], start=1):
        found = first_difference(skeletons[0], skeleton) or ("state", "its skeleton", "another")
        places.setdefault(found[:2], []).append((rank, found[2]))
    parts = [f"{where}: rank 0 holds {mine}, " + ", ".join(f"rank {r} holds {theirs}" for r, theirs in others)
             for (where, mine), others in places.items()]
    return CheckpointError("the ranks' states differ outside PerRank values, so a save of rank 0's would restore "
                           "wrong state on the others: " + "; ".join(parts)
                           + ". Make the ranks agree, or wrap state that differs by rank in "
                           "trainio.checkpoint.PerRank(...) to save each rank's own")


def value_digest(leaf: ArrayLeaf) -> str:
    """The xxh3-128 of a leaf's live elements (C order, little-endian), as the snapshot would copy them.

    CPU memory is hashed where it lies (the GIL is released for large
    buffers); a device tensor goes through host copies of at most 64 MiB.
    """
    import numpy as np

    if leaf.kind != "torch":
        array = np.ascontiguousarray(leaf.value)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        return digest(array.reshape(-1).view(np.uint8).data)
    import torch

    tensor = leaf.value.detach().resolve_conj().resolve_neg().contiguous()
    if tensor.numel() == 0:
        return digest(b"")
    raw = tensor.reshape(-1).view(torch.uint8)
    if raw.device.type == "cpu":
        return digest(raw.numpy())
    hasher = Hasher()
    for start in range(0, raw.numel(), _DEVICE_PIECE_BYTES):
        hasher.update(raw[start:start + _DEVICE_PIECE_BYTES].cpu().numpy())
    return hasher.hexdigest()
