"""The skeleton's nodes, as the manifest stores them, and how to walk them."""

from __future__ import annotations

from typing import Any

Node = dict[str, Any]
"""One node of the skeleton, as stored in the manifest."""


def children(node: Node) -> list[Node]:
    """The nodes directly under ``node``: a container's items, an object's state, every rank's sub-tree."""
    kind = node["t"]
    if kind == "dict":
        return [child for _, child in node["items"]]
    if kind in ("list", "tuple"):
        return list(node["items"])
    if kind == "object":
        return [node["state"]]
    if kind == "per_rank":
        return list(node["ranks"])
    return []
