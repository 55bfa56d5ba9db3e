"""State that differs by rank: refused unless wrapped in PerRank, which is saved and restored per rank."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager, FileEntry, Manifest, PerRank
from trainio.checkpoint._save.plan import make_plan
from trainio.storage import CheckpointError, FormatError

from ._ranks import run_ranks, values

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` is the quick lane; .ci/run runs everything

torch = pytest.importorskip("torch")

HERE = "tests.checkpoint.test_per_rank"


def _seed_everything(rank: int) -> np.random.Generator:
    torch.manual_seed(100 + rank)
    random.seed(300 + rank)
    return np.random.default_rng(200 + rank)


def _rng_state(generator: np.random.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": generator.bit_generator.state, "python": random.getstate()}


def _draw(generator: np.random.Generator) -> list[list[float]]:
    return [torch.rand(3).tolist(), generator.random(3).tolist(), [random.random() for _ in range(3)]]


def _set_rng_state(generator: np.random.Generator, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    generator.bit_generator.state = state["numpy"]
    random.setstate(state["python"])


def _model() -> dict[str, Any]:
    return {"w": torch.arange(12.0).reshape(3, 4), "big": torch.ones(300, 300)}


def save_rng_and_resume(rank: int, world: int, root: str) -> dict[str, Any]:
    """Save each rank's RNG state per rank, draw, lose the state, restore it (in place and not), draw again."""
    generator = _seed_everything(rank)
    state = {"model": _model(), "rng": PerRank(_rng_state(generator)), "step": 3}
    with CheckpointManager([root], timeout_s=60) as manager:
        manager.save(3, state).wait()
        expected = _draw(generator)
        _draw(generator)  # the training goes on: the live RNG moves past the saved state
        target = {"model": {"w": torch.zeros(3, 4), "big": torch.zeros(300, 300)},
                  "rng": PerRank(_rng_state(generator)), "step": None}
        torch_target = target["rng"].value["torch"]
        restored = manager.restore(into=target)
        assert isinstance(restored["rng"], PerRank) and restored["step"] == 3
        assert restored["rng"].value["torch"] is torch_target, "the RNG tensor of into= is filled in place"
        assert torch.equal(target["model"]["w"], _model()["w"])
        _set_rng_state(generator, restored["rng"].value)
        in_place = _draw(generator)
        fresh = manager.restore()
        assert isinstance(fresh["rng"], PerRank) and isinstance(fresh["rng"].value["python"], tuple)
        _set_rng_state(generator, fresh["rng"].value)
        again = _draw(generator)
    return {"expected": expected, "in_place": in_place, "again": again}


def test_per_rank_rng_state_of_a_two_rank_save_is_restored_to_each_rank(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    seen = values(run_ranks(2, f"{HERE}.save_rng_and_resume", tmp_path / "out", str(root)))
    for rank, s in enumerate(seen):
        assert s["in_place"] == s["expected"] and s["again"] == s["expected"], rank
    assert seen[0]["expected"] != seen[1]["expected"], "each rank resumes its own stream, not rank 0's"
    manifest = json.loads((root / "000000000003" / "manifest.json").read_text())
    assert {"rng/rank-0/torch", "rng/rank-1/torch"} <= set(manifest["arrays"])
    rng = dict(manifest["tree"]["items"])["rng"]
    assert rng["t"] == "per_rank" and len(rng["ranks"]) == 2

    with CheckpointManager([root]) as manager:  # another world size: one process
        with pytest.raises(CheckpointError, match=r"state\['rng'\]: a PerRank value saved by 2 rank\(s\) cannot "
                                                  r"be restored on 1"):
            manager.restore()
        rest = manager.restore(keys=["model", "step"])
    assert torch.equal(rest["model"]["w"], _model()["w"]) and rest["step"] == 3


class _Counter:
    """An object with state_dict(): a per-rank counter when it should be a per-rank value."""

    def __init__(self, n: int) -> None:
        self.n = n

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.n, "name": "counter"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = state["seen"]


def save_differing_state(rank: int, world: int, root: str) -> dict[str, Any]:
    """Try saves whose plain tensors or JSON values differ by rank (one right after an agreed save of the same
    layout, whose plan it reuses); then a good one."""
    torch.manual_seed(rank)
    attempts = {
        "tensor": {"model": _model(), "rng": torch.get_rng_state()},
        "agreed": {"model": _model(), "noise": np.full(4, 7, dtype=np.int64)},
        "array": {"model": _model(), "noise": np.full(4, rank, dtype=np.int64)},  # the same layout: plan reused
        "json": {"model": _model(), "meta": {"lr": 0.1, "seen": 10 * rank}},
        "object": {"model": _model(), "data": _Counter(5 + rank)},
        "keys": {"model": _model(), "meta": {"lr": 0.1, f"only_on_{rank}": 1}},
    }
    seen: dict[str, Any] = {}
    with CheckpointManager([root], timeout_s=60) as manager:
        for step, (name, state) in enumerate(attempts.items(), start=1):
            try:
                manager.save(step, state).wait()
                seen[name] = "saved"
            except CheckpointError as exc:
                seen[name] = str(exc)
        manager.save(10, {"model": _model(), "data": PerRank(_Counter(5 + rank)), "rng": PerRank(
            torch.get_rng_state())}).wait()
        seen["steps"] = manager.steps()[root]
        restored = manager.restore(into={"data": PerRank(_Counter(0))})
        seen["counter"] = restored["data"].value.n
    return seen


def test_state_that_differs_by_rank_outside_per_rank_is_refused_naming_the_place_and_ranks(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    seen = values(run_ranks(2, f"{HERE}.save_differing_state", tmp_path / "out", str(root)))
    for rank, s in enumerate(seen):
        assert "state['rng'] (rank(s) [1] hold other bytes than rank 0)" in s["tensor"], (rank, s)
        assert "PerRank" in s["tensor"]
        assert "state['noise'] (rank(s) [1]" in s["array"], (rank, s)
        assert "state['meta']['seen']: rank 0 holds 0, rank 1 holds 10" in s["json"], (rank, s)
        assert "state['data'].state_dict()['seen']: rank 0 holds 5, rank 1 holds 6" in s["object"], (rank, s)
        assert "state['meta']: rank 0 holds a dict with keys ['lr', 'only_on_0'], rank 1 holds" in s["keys"]
        assert s["agreed"] == "saved"
        assert s["steps"] == [2, 10], "no refused step was committed"
        assert s["counter"] == 5 + rank


def test_a_single_process_saves_and_restores_per_rank_values(tmp_path: Path) -> None:
    generator = _seed_everything(0)
    state = {"rng": PerRank(_rng_state(generator)), "count": PerRank(7), "w": PerRank(np.arange(5.0))}
    with CheckpointManager([tmp_path]) as manager:
        manager.save(1, state).wait()
        expected = _draw(generator)
        w = np.zeros(5)
        restored = manager.restore(into={"rng": PerRank(_rng_state(generator)), "count": None, "w": w})
        assert restored["count"] == PerRank(7)
        assert restored["w"].value is w, "a bare array at a PerRank's place is filled in place"
        assert np.array_equal(w, np.arange(5.0))
        _set_rng_state(generator, restored["rng"].value)
        assert _draw(generator) == expected
        with pytest.raises(CheckpointError, match=r"state\['x'\]\['y'\]: a PerRank inside a PerRank"):
            manager.save(2, {"x": PerRank({"y": PerRank(1)})})


def test_the_manifest_needs_one_sub_tree_per_rank_of_a_per_rank_node() -> None:
    tree = {"t": "dict", "items": [["rng", {"t": "per_rank", "ranks": [{"t": "json", "value": 1}]}]]}
    files = {"state.zarr/zarr.json": FileEntry(2, "0" * 32)}
    assert Manifest.from_bytes(Manifest(1, tree, {}, files, world_size=1).to_bytes(), "mem").tree == tree
    with pytest.raises(FormatError, match="one sub-tree per rank"):
        Manifest.from_bytes(Manifest(1, tree, {}, files, world_size=2).to_bytes(), "mem")


def _row(path: str, digest: str | None, rank: int | None = None) -> list[Any]:
    return [path, "torch", "float32", "float32", [4], 4, None, rank, digest]


def test_plans_refuse_replicated_arrays_that_differ_and_give_per_rank_arrays_to_their_rank() -> None:
    with pytest.raises(CheckpointError, match=r"state\['w'\] \(rank\(s\) \[1, 2\] hold other bytes than rank 0\)"):
        make_plan([[_row("w", "a" * 32)], [_row("w", "b" * 32)], [_row("w", "b" * 32)]], 1 << 20, 1 << 10, None,
                  {"w": "state['w']"})
    plan = make_plan([[_row("w", "a" * 32), _row("r/rank-0", None, 0)],
                      [_row("w", "a" * 32), _row("r/rank-1", None, 1)]], 1 << 20, 1 << 10, None)
    assert plan.arrays["w"].packed is not None
    assert {u.path: u.owner for u in plan.units} == {"r/rank-0": 0, "r/rank-1": 1}
    assert all(plan.arrays[p].packed is None for p in ("r/rank-0", "r/rank-1"))
