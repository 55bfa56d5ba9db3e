"""Shard geometry and the write plan (of any world, a single process's included), without a process group."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint import CheckpointOptions
from trainio.checkpoint._format.boxes import Box, chunk_box, chunk_bytes_of, chunk_indices, contiguous_run, grid_chunks
from trainio.checkpoint._save.plan import make_plan
from trainio.storage import CheckpointError


def _row_shards(n: int, world: int, width: int) -> list[Box]:
    size = -(-n // world)
    return [Box((min(r * size, n), 0), (max(0, min(size, n - r * size)), width)) for r in range(world)]


@pytest.mark.parametrize(("n", "world", "chunks"), [(10, 4, (3, 6)), (8, 4, (2, 6)), (3, 4, (1, 6)), (7, 1, (7, 6))])
def test_the_grid_follows_torch_style_uneven_shards(n: int, world: int, chunks: tuple[int, ...]) -> None:
    assert grid_chunks((n, 6), 4, 1 << 20, _row_shards(n, world, 6)) == chunks


def test_large_shards_are_cut_on_their_own_boundaries() -> None:
    boxes = _row_shards(2000, 4, 300)  # 500 rows of 1200 bytes each
    assert grid_chunks((2000, 300), 4, 64 << 10, boxes) == (50, 300)  # 50 divides 500; 54 would fit
    assert grid_chunks((2000, 300), 4, 64 << 10, []) == (54, 300)  # one box: any cut, edge padded


def test_nested_shards_of_one_dimension_get_a_common_grid() -> None:
    # [Shard(0), Shard(0)] on a 2 x 2 mesh splits 10 rows as 3, 2, 3, 2.
    boxes = [Box((0,), (3,)), Box((3,), (2,)), Box((5,), (3,)), Box((8,), (2,))]
    chunks = grid_chunks((10,), 4, 1 << 20, boxes)
    assert chunks == (1,)
    for box in boxes:
        assert all(chunk_box(i, chunks, (10,)).intersect(box) == chunk_box(i, chunks, (10,))
                   for i in chunk_indices(box, chunks))


@pytest.mark.parametrize(("part", "outer", "run"), [
    (Box((2, 0), (3, 6)), Box((0, 0), (10, 6)), (12, 18)),
    (Box((2, 1), (1, 4)), Box((0, 0), (10, 6)), (13, 4)),
    (Box((2, 1), (2, 4)), Box((0, 0), (10, 6)), None),
    (Box((5, 0, 0), (1, 2, 3)), Box((4, 0, 0), (3, 2, 3)), (6, 6)),
])
def test_contiguous_runs(part: Box, outer: Box, run: tuple[int, int] | None) -> None:
    assert contiguous_run(part, outer) == run


def test_an_edge_chunk_is_padded_in_every_dimension() -> None:
    block = np.arange(6, dtype=np.int16).reshape(2, 3)
    padded = np.frombuffer(chunk_bytes_of(block, Box((3, 4), (2, 3)), (3, 4), (1, 1)), np.int16).reshape(3, 4)
    assert np.array_equal(padded[:2, :3], block) and not padded[2].any() and not padded[:, 3].any()


def _rows(path: str, shape: list[int], box: Box | None, dtype: str = "float32", kind: str = "torch") -> list[Any]:
    return [path, kind, dtype, dtype, shape, 4, None if box is None else box.to_json()]


def test_replicated_tensors_are_spread_and_small_ones_packed() -> None:
    world = 4
    per_rank = [[_rows(f"big{i}", [1000, 1000], None) for i in range(8)] + [_rows("bias", [10], None)]
                for _ in range(world)]
    plan = make_plan(per_rank, 1 << 20, 1024, None)
    owners = [u.owner for u in plan.units]
    assert sorted(owners) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert plan.arrays["bias"].packed == 0 and plan.pack is not None
    assert all(len(u.chunks) == math.prod(-(-n // c) for n, c in zip((1000, 1000), plan.arrays[u.path].chunks))
               for u in plan.units)


def test_each_chunk_has_one_writer_even_when_shards_are_replicated() -> None:
    # [Shard(0), Replicate()] on a 2 x 2 mesh: ranks 0, 1 hold rows 0-4; ranks 2, 3 rows 5-9.
    halves = [Box((0, 0), (5, 4)), Box((0, 0), (5, 4)), Box((5, 0), (5, 4)), Box((5, 0), (5, 4))]
    plan = make_plan([[_rows("w", [10, 4], b)] for b in halves], 1 << 20, 0, None)
    assert len(plan.units) == 2 and {u.owner for u in plan.units} <= {0, 1, 2, 3}
    assert plan.units[0].owner in (0, 1) and plan.units[1].owner in (2, 3)
    claimed = [i for u in plan.units for i in u.chunks]
    assert len(claimed) == len(set(claimed)) == 2


def test_plans_refuse_mismatched_or_uncovered_states() -> None:
    with pytest.raises(CheckpointError, match="rank 1's state has other arrays"):
        make_plan([[_rows("a", [4], None)], [_rows("b", [4], None)]], 1 << 20, 0, None)
    with pytest.raises(CheckpointError, match="a: rank 1 holds float64"):
        make_plan([[_rows("a", [4], None)], [_rows("a", [4], None, "float64")]], 1 << 20, 0, None)
    with pytest.raises(CheckpointError, match="hold 1 of its 2 chunks"):
        make_plan([[_rows("a", [4], Box((0,), (2,)))], [_rows("a", [4], Box((0,), (2,)))]], 1 << 20, 0, None)


def test_a_layout_saved_again_reuses_its_plan(tmp_path: Path) -> None:
    from trainio.checkpoint._format.state_tree import flatten
    from trainio.checkpoint._save.collective import WorldOfOne
    from trainio.checkpoint._save.protocol import StepSaves
    from trainio.checkpoint._tiers import open_tier_io
    from trainio.storage import open_store

    saves = StepSaves(WorldOfOne(), CheckpointOptions(chunk_bytes=1 << 20, pack_bytes=1024))
    tier = open_tier_io(open_store(tmp_path), "t")

    def plan(state: dict[str, Any]) -> Any:
        return saves.plan(1, *flatten(state), None, tier)[0]

    first = plan({"w": np.zeros((64, 64), np.float32), "b": np.zeros(4)})
    assert plan({"w": np.ones((64, 64), np.float32), "b": np.ones(4)}) is first  # new values, the same layout
    assert plan({"w": np.ones((64, 65), np.float32), "b": np.ones(4)}) is not first


_NUMPY_SAVE = """
import sys
import numpy as np
from trainio.checkpoint import CheckpointManager
from trainio.checkpoint._save.protocol import StepSaves

planned = []
real = StepSaves.plan
StepSaves.plan = lambda self, *args: planned.append(self.world) or real(self, *args)
with CheckpointManager([sys.argv[1]]) as manager:
    manager.save(1, {"w": np.arange(10.0), "step": 1})
    manager.wait()
    restored = manager.restore()
assert restored["step"] == 1 and (restored["w"] == np.arange(10.0)).all()
print(planned, "torch" in sys.modules, "torch.distributed" in sys.modules)
"""


def test_a_single_process_saves_through_the_plan_as_a_world_of_one_without_torch(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _NUMPY_SAVE, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[1]", "False", "False"]
