"""What the nodes hold of each step, put together from their commit records (on rank 0)."""

from __future__ import annotations

from typing import Any

from .nodes import Nodes


def node_groups(held: list[dict[int, list[Any]]], nodes: Nodes) -> dict[int, dict[str, Any]]:
    """For each step some node holds, the nodes holding the same save of it, and which hold each part.

    ``held[r]`` is what rank ``r``'s node reported (its first rank; the
    others report nothing): ``{step: NodeRecord.summary()}``. Records of one
    step that name another save (``run``) or root manifest are another group;
    the group returned for a step is its whole one (every part and the root's
    files on some node), else the one on most nodes. A group is
    ``{"step", "run", "root": [size, xxh3], "count", "world", "nodes",
    "parts": {rank: [nodes]}, "root_nodes", "whole"}``.
    """
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rank, steps in enumerate(held):
        node = nodes.node_of(rank)
        for step, (run, size, xxh3, parts, root_files, count, world) in steps.items():
            group = groups.setdefault((step, run, size, xxh3), {
                "step": step, "run": run, "root": [size, xxh3], "count": count, "world": world, "nodes": [],
                "parts": {}, "root_nodes": []})
            group["nodes"].append(node)
            for part in parts:
                group["parts"].setdefault(part, []).append(node)
            if root_files:
                group["root_nodes"].append(node)
    best: dict[int, dict[str, Any]] = {}
    for group in groups.values():
        group["whole"] = len(group["parts"]) == group["count"] and bool(group["root_nodes"])
        known = best.get(group["step"])
        if known is None or (group["whole"], len(group["nodes"])) > (known["whole"], len(known["nodes"])):
            best[group["step"]] = group
    return best


def settle(held: list[dict[int, list[Any]]], nodes: Nodes, further: set[int] | None) -> dict[int, list[Any] | None]:
    """Rank 0: for each step some node holds, the save every node keeps (``[run, root xxh3]``), or None: drop it.

    A crash between the commit decision and the last node's record leaves
    nodes that disagree. Every node settles the same way: a step whose every
    part is on some node, or that a further tier (``further``: their steps)
    holds, is kept (a node that lacks it renames its finished directory into
    place if it has one, or gets its part back from a replica at the next
    restore); a step neither whole on the nodes nor on a further tier can
    never be restored and is dropped everywhere, so a retry of its number
    starts clean. Records of another save of a kept step are dropped. Steps
    that a job of another world size saved are left alone (this job may see
    only some of their nodes). With ``further`` None (the further tiers could
    not be listed), no step is dropped for being incomplete.
    """
    verdict: dict[int, list[Any] | None] = {}
    for step, group in node_groups(held, nodes).items():
        if group["world"] != nodes.world:
            continue
        kept = group["whole"] or further is None or step in further
        verdict[step] = [group["run"], group["root"][1]] if kept else None
    return verdict


def uploaders(group: dict[str, Any] | None, nodes: Nodes) -> tuple[dict[int, list[int]], int] | str:
    """Rank 0: who uploads each part of a step in a promotion from the nodes, or why none can.

    Returns ``{rank: [parts]}`` and the rank that uploads the root's files.
    A part is uploaded from its own node when that node holds it (the rank
    that wrote it, when the world is the saving one), else from a node that
    keeps its replica, so a lost node's part still reaches the shared tiers.
    """
    if group is None or not group["whole"]:
        missing = [] if group is None else sorted(set(range(group["world"])) - set(group["parts"]))
        return f"the nodes no longer hold all of the step (parts of ranks {missing[:8]} are on no node)"
    by_rank: dict[int, list[int]] = {}
    for part, holders in sorted(group["parts"].items()):
        home = nodes.node_of(part) if part < nodes.world else -1
        node = home if home in holders else holders[part % len(holders)]
        ranks = nodes.ranks(node)
        by_rank.setdefault(ranks[part % len(ranks)], []).append(part)
    root_nodes = group["root_nodes"]
    return by_rank, nodes.leader(0 if 0 in root_nodes else root_nodes[0])
