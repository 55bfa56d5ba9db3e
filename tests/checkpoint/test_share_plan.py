"""Each rank's share of a save, planned alone from placements: the same boxes as torch, every chunk written once."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint._format.boxes import Box, chunk_indices, grid_chunks
from trainio.checkpoint._format.placement import Mesh, Placement, mesh_boxes, ravel, unravel
from trainio.checkpoint._format.state_tree import ArrayLeaf
from trainio.checkpoint._format.writers import chunk_writer
from trainio.checkpoint._save.plan import make_plan
from trainio.checkpoint._save.share_plan import Layout, describe_layout, share_plan

torch_utils = pytest.importorskip("torch.distributed.tensor._utils")
tensor = pytest.importorskip("torch.distributed.tensor")


def _torch_box(shape: tuple[int, ...], mesh: tuple[int, ...], shards: tuple[int | None, ...],
               coordinate: list[int]) -> Box:
    places = [tensor.Replicate() if d is None else tensor.Shard(d) for d in shards]
    local, offset = torch_utils._compute_local_shape_and_global_offset(shape, mesh, coordinate, places)
    if any(n == 0 for n in local):
        return Box((0,) * len(shape), tuple(local))
    return Box(tuple(offset), tuple(local))


def _cases(count: int) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int | None, ...]]]:
    rng = random.Random(7)
    cases = []
    for _ in range(count):
        ndim = rng.randint(1, 3)
        shape = tuple(rng.choice([0, 1, 2, 3, 5, 7, 10, 16, 33]) for _ in range(ndim))
        mesh = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 3)))
        shards = tuple(rng.choice([None, *range(ndim)]) for _ in mesh)
        cases.append((shape, mesh, shards))
    return cases


@pytest.mark.parametrize(("shape", "mesh", "shards"), _cases(300))
def test_the_rule_puts_every_coordinate_where_torch_does(shape: tuple[int, ...], mesh: tuple[int, ...],
                                                         shards: tuple[int | None, ...]) -> None:
    placement = Placement(Mesh(mesh, tuple(range(math.prod(mesh)))), shards)
    boxes = mesh_boxes(shape, placement)
    for flat, coordinate in enumerate(itertools.product(*(range(m) for m in mesh))):
        expected = _torch_box(shape, mesh, shards, list(coordinate))
        assert boxes.box(flat) == expected, (flat, coordinate)
        assert mesh_boxes(shape, placement, only=flat).box(0) == expected


@pytest.mark.parametrize("shape", [(), (1,), (4,), (3, 1, 5), (2, 7, 3, 2)])
def test_ravel_and_unravel_agree_with_numpy(shape: tuple[int, ...]) -> None:
    for flat in range(math.prod(shape)):
        where = [int(i) for i in np.unravel_index(flat, shape)] if shape else []
        assert unravel(flat, shape) == where
        assert ravel(where, shape) == flat


def _leaf(path: str, shape: tuple[int, ...], placement: Placement | None, rank: int) -> ArrayLeaf:
    box = None
    if placement is not None:
        box = mesh_boxes(shape, placement, only=placement.mesh.ranks.index(rank)).box(0)
        box = None if box == Box.whole(shape) else box
    return ArrayLeaf(path, path, None, "torch", "float32", "float32", shape, 4, box, placement is not None, None,
                     placement)


def _state(rank: int, world: int) -> list[ArrayLeaf]:
    """Uneven 1-D shards, a 2-D mesh (HSDP-style and 2-D sharded), a mesh in another rank order, replicated."""
    one = Mesh((world,), tuple(range(world)))
    two = Mesh((2, world // 2) if world > 1 else (1, 1), tuple(range(world)))
    shuffled = Mesh((world,), tuple(reversed(range(world))))
    return [
        _leaf("fsdp", (37, 5), Placement(one, (0,)), rank),
        _leaf("hsdp", (21, 4), Placement(two, (None, 0)), rank),
        _leaf("grid", (9, 10), Placement(two, (0, 1)), rank),
        _leaf("twice", (23,), Placement(two, (0, 0)), rank),
        _leaf("reversed", (11, 3), Placement(shuffled, (0,)), rank),
        _leaf("rep", (300, 40), None, rank),
        _leaf("rep2", (300, 41), None, rank),
        _leaf("small", (3,), None, rank),
    ]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_chunk_is_written_once_by_a_rank_that_holds_it(world: int) -> None:
    leaves = {rank: _state(rank, world) for rank in range(world)}
    layouts = {rank: describe_layout(leaves[rank], rank, world) for rank in range(world)}
    assert all(layout is not None for layout in layouts.values())
    assert len({layout.digest for layout in layouts.values() if layout is not None}) == 1
    plans = {rank: share_plan(layout, [[]] * world, rank, world, 256, 64, None)
             for rank, layout in layouts.items() if layout is not None}
    specs = plans[0].arrays
    assert all(plan.arrays == specs for plan in plans.values())
    assert specs["small"].packed is not None and specs["rep"].packed is None
    written: dict[tuple[str, tuple[int, ...]], int] = {}
    for rank, plan in plans.items():
        held = {leaf.path: leaf.box or Box.whole(leaf.shape) for leaf in leaves[rank]}
        for unit in plan.units:
            assert unit.owner == rank and unit.box == held[unit.path], "a rank writes only what it holds"
            for index in unit.chunks:
                assert (unit.path, index) not in written, f"{unit.path}{index} has two writers"
                written[(unit.path, index)] = rank
    for path, spec in specs.items():
        if spec.packed is None:
            grid = [range(-(-n // c)) for n, c in zip(spec.shape, spec.chunks, strict=True)]
            assert {i for p, i in written if p == path} == set(itertools.product(*grid)), path
    assert len({written[("rep", i)] for i in chunk_indices(Box.whole((300, 40)), specs["rep"].chunks)}) == 1


def test_the_grid_matches_the_plan_made_from_exchanged_boxes() -> None:
    world = 4
    rows: list[list[list[Any]]] = []
    for rank in range(world):
        rows.append([[leaf.path, leaf.kind, leaf.dtype, leaf.stored, list(leaf.shape), leaf.itemsize,
                      None if leaf.box is None else leaf.box.to_json(), None, None] for leaf in _state(rank, world)])
    exchanged = make_plan(rows, 256, 64, None)
    layout = describe_layout(_state(0, world), 0, world)
    assert layout is not None
    alone = share_plan(layout, [[]] * world, 0, world, 256, 64, None)
    assert alone.arrays == exchanged.arrays and alone.pack == exchanged.pack


def test_a_mesh_that_is_not_the_whole_job_is_planned_by_exchange() -> None:
    half = Mesh((2,), (0, 1))
    assert describe_layout([_leaf("tp", (8, 2), Placement(half, (0,)), 1)], 1, 4) is None


def test_a_shard_that_is_not_where_the_rule_puts_it_is_planned_by_exchange() -> None:
    mesh = Mesh((2,), (0, 1))
    leaf = _leaf("w", (8, 2), Placement(mesh, (0,)), 1)
    moved = ArrayLeaf("w", "w", None, "torch", "float32", "float32", (8, 2), 4, Box((0, 0), (4, 2)), True, None,
                      leaf.placement)
    assert describe_layout([leaf], 1, 2) is not None
    assert describe_layout([moved], 1, 2) is None


def test_per_rank_arrays_are_their_ranks_and_rank_0_knows_every_one() -> None:
    layout = Layout([], [], [["rng/rank-0", "numpy", "uint32", "uint32", [624], 4]])
    everyone = [[["rng/rank-0", "numpy", "uint32", "uint32", [624], 4]],
                [["rng/rank-1", "numpy", "uint32", "uint32", [624], 4]]]
    plan = share_plan(layout, everyone, 0, 2, 1 << 20, 0, None)
    assert set(plan.arrays) == {"rng/rank-0", "rng/rank-1"} and [u.path for u in plan.units] == ["rng/rank-0"]
    assert plan.arrays["rng/rank-0"].chunks == grid_chunks((624,), 4, 1 << 20, [])


@pytest.mark.parametrize("world", [2, 4, 8])
def test_the_root_names_the_writer_of_every_chunk(world: int) -> None:
    """What a reader computes from the root's ``writers`` is the rank that wrote the chunk, both ways of planning."""
    plans = []
    for rank in range(world):
        layout = describe_layout(_state(rank, world), rank, world)
        assert layout is not None
        plans.append(share_plan(layout, [[]] * world, rank, world, 256, 64, None))
    rows = [[[leaf.path, leaf.kind, leaf.dtype, leaf.stored, list(leaf.shape), leaf.itemsize,
              None if leaf.box is None else leaf.box.to_json(), None, None] for leaf in _state(rank, world)]
            for rank in range(world)]
    exchanged = make_plan(rows, 256, 64, None)
    for plan, units in [(plans[0], [u for p in plans for u in p.units]), (exchanged, exchanged.units)]:
        for unit in units:
            spec = plan.arrays[unit.path]
            writer = chunk_writer(plan.writers[unit.path], plan.meshes, spec.shape, spec.chunks)
            assert all(writer(index) == unit.owner for index in unit.chunks), unit.path


def test_the_scale_benchmark_reports_what_each_rank_computes_and_sends() -> None:
    bench = Path(__file__).parents[2] / "benchmarks" / "checkpoint_scale.py"
    done = subprocess.run([sys.executable, str(bench), "--ranks", "64", "--arrays", "20", "--sample", "3", "--json"],
                          capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout)
    assert result["ranks"] == 64 and result["sampled_ranks"][0] == 0 and len(result["sampled_ranks"]) == 3
    assert result["plan_s"] > result["reuse_s"] > 0
    assert 0 < result["root_manifest_bytes"] and 0 < result["max_part_bytes"] < result["root_manifest_bytes"]
    assert 64 * 100 < result["max_rank_bytes"] < 64 * 2000, "rank 0 gets a few digests from each rank, no more"
