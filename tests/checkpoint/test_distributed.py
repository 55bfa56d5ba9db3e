"""Multi-rank checkpoints on real gloo jobs: sharded saves, restores under another world size and mesh."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager

from ._ranks import run_ranks, values
from .test_format import zarr_read

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` is the quick lane; .ci/run runs everything

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.tensor")

CHUNK = 64 << 10
HERE = "tests.checkpoint.test_distributed"


def global_state(seed: int = 0) -> dict[str, Any]:
    """The full tensors every test state is cut from; the same on every rank."""
    g = torch.Generator().manual_seed(1234 + seed)
    return {
        "w": torch.randn(10, 6, generator=g),  # 10 rows over 4 ranks: 3, 3, 3, 1
        "x": torch.randn(5, 9, generator=g).to(torch.bfloat16),
        "y": torch.randn(6, 8, generator=g),
        "rep": torch.randn(4, 4, generator=g),
        "big_shard": torch.randn(2000, 300, generator=g),
        "big": [torch.randn(300, 300, generator=g) for _ in range(3)],
        "small": [torch.randn(5, generator=g) for _ in range(4)],
        "np": np.arange(12, dtype=np.int32).reshape(3, 4),
        "meta": {"lr": 0.1, "name": "run", "nan": float("nan")},
    }


def _save_placements(world: int) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard

    return {"w": ("1d", [Shard(0)]), "x": ("1d", [Shard(1)]), "y": ("2d", [Shard(0), Shard(1)]),
            "rep": ("1d", [Replicate()]), "big_shard": ("1d", [Shard(0)])}


def _restore_placements(world: int) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard

    return {"w": ("1d", [Shard(1)]), "x": ("1d", [Shard(0)]), "y": ("1d", [Shard(0)]),
            "rep": ("1d", [Shard(0)]), "big_shard": ("2d", [Shard(1), Replicate()])}


def shard(state: dict[str, Any], world: int, placements: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the named tensors made DTensors of ``placements`` (1-D mesh, or 2 x world/2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    meshes = {"1d": init_device_mesh("cpu", (world,)), "2d": init_device_mesh("cpu", (2, max(1, world // 2)))}
    out = dict(state)
    for name, (mesh, places) in placements.items():
        out[name] = distribute_tensor(state[name], meshes[mesh], places)
    return out


def _zeros(state: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _check_shards(restored: dict[str, Any], expected: dict[str, Any], placements: dict[str, Any]) -> None:
    from torch.distributed.tensor import DTensor

    for name in placements:
        value = restored[name]
        assert isinstance(value, DTensor), name
        assert torch.equal(value.full_tensor(), expected[name]), name


def _log_writes(log_dir: str, rank: int) -> None:
    """Record every file this rank writes or links, to check that each file has one writer."""
    from trainio.checkpoint._tiers.local import LocalStepWriter

    path = Path(log_dir, f"writes-{rank}.txt")
    write, link = LocalStepWriter.write, LocalStepWriter.link

    def logged_write(self: Any, key: str, data: memoryview, size: int) -> None:
        with path.open("a") as f:
            f.write(key + "\n")
        write(self, key, data, size)

    def logged_link(self: Any, step: int, key: str) -> None:
        with path.open("a") as f:
            f.write(key + "\n")
        link(self, step, key)

    LocalStepWriter.write = logged_write  # type: ignore[method-assign]
    LocalStepWriter.link = logged_link  # type: ignore[method-assign]


def save_and_restore(rank: int, world: int, root: str, log_dir: str) -> dict[str, Any]:
    """Save a sharded state as step 1, then restore it into fresh DTensors of the same placements."""
    _log_writes(log_dir, rank)
    expected = global_state()
    with CheckpointManager([root], chunk_bytes=CHUNK, timeout_s=60) as manager:
        handle = manager.save(1, shard(expected, world, _save_placements(world)))
        handle.wait()
        target = shard(_zeros(expected), world, _save_placements(world))
        restored, report = manager.restore_with_report(into=target)
        total = manager._io[0].manifest(1).nbytes
        planned_alone = manager._saves._shared is not None and manager._saves._previous is None
    _check_shards(restored, expected, _save_placements(world))
    assert report.bytes < total / 2, "each rank reads the chunks of its own shards, not the whole step"
    for a, b in zip(restored["big"], expected["big"], strict=True):
        assert torch.equal(a, b)
    return {"result": {k: v.status for k, v in handle.result().items()}, "planned_alone": planned_alone}


def save_on_sub_meshes(rank: int, world: int, root: str) -> bool:
    """Tensor-parallel halves of a 2 x 2 job, each on its own 1-D mesh: the ranks must exchange their boxes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    expected = global_state()
    tp = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))["tp"]
    state = {"w": distribute_tensor(expected["w"], tp, [Shard(0)]), "big": expected["big"]}
    with CheckpointManager([root], chunk_bytes=CHUNK, timeout_s=60) as manager:
        manager.save(1, state).wait()
        manager.save(2, state).wait()
        return manager._saves._shared is None and manager._saves._previous is not None


def test_tensor_parallel_sub_meshes_are_planned_by_exchanging_boxes(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    assert values(run_ranks(4, f"{HERE}.save_on_sub_meshes", tmp_path / "out", str(root))) == [True] * 4
    expected = global_state()
    with CheckpointManager([root]) as manager:
        restored = manager.restore(2)
    assert torch.equal(restored["w"], expected["w"])
    assert all(torch.equal(a, b) for a, b in zip(restored["big"], expected["big"], strict=True))


def parts_read_in_place(rank: int, world: int, root: str) -> list[int]:
    """Save FSDP-style shards, restore them in place in a new manager: the parts this rank's restore read."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from trainio.checkpoint._format import parts

    expected = global_state()
    mesh = init_device_mesh("cpu", (world,))
    state = {name: distribute_tensor(expected[name], mesh, [Shard(0)]) for name in ("w", "y", "big_shard")}
    with CheckpointManager([root], chunk_bytes=CHUNK, timeout_s=60) as manager:
        manager.save(1, state).wait()
    read: list[int] = []
    parse = parts.parse_part

    def counted(data: bytes, where: str, key: str, step: int, part: int) -> Any:
        read.append(part)
        return parse(data, where, key, step, part)

    parts.parse_part = counted  # type: ignore[assignment]
    target = {name: distribute_tensor(torch.zeros_like(expected[name]), mesh, [Shard(0)]) for name in state}
    with CheckpointManager([root], chunk_bytes=CHUNK, timeout_s=60) as manager:
        restored = manager.restore(into=target)
    _check_shards(restored, expected, {name: None for name in state})
    return sorted(set(read))


def test_a_rank_restoring_its_own_shards_reads_only_its_own_part(tmp_path: Path) -> None:
    read = values(run_ranks(4, f"{HERE}.parts_read_in_place", tmp_path / "out", str(tmp_path / "ckpt")))
    assert read == [[0], [1], [2], [3]], "each rank reads the root and its own part, not every rank's"


def restore_resharded(rank: int, world: int, root: str) -> None:
    """Restore step 1 into other placements on another world size; plain tensors come back whole."""
    expected = global_state()
    with CheckpointManager([root], chunk_bytes=CHUNK, timeout_s=60) as manager:
        target = shard(_zeros(expected), world, _restore_placements(world))
        del target["big"]
        restored = manager.restore(into=target)
    _check_shards(restored, expected, _restore_placements(world))
    for a, b in zip(restored["big"], expected["big"], strict=True):
        assert isinstance(a, torch.Tensor) and torch.equal(a, b)
    assert restored["meta"]["name"] == "run" and np.array_equal(restored["np"], expected["np"])


@pytest.fixture(scope="module")
def four_way_step(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Any]]:
    """A step saved by 4 ranks, and what each rank wrote."""
    base = tmp_path_factory.mktemp("four-way")
    root, logs = base / "ckpt", base / "logs"
    logs.mkdir()
    results = values(run_ranks(4, f"{HERE}.save_and_restore", base / "out", str(root), str(logs)))
    return root, logs, results


def test_a_four_way_save_restores_in_place_on_four_ranks(four_way_step: tuple[Path, Path, list[Any]]) -> None:
    root, _, results = four_way_step
    assert all(r["result"] == {str(root): "committed"} for r in results)
    assert all(r["planned_alone"] for r in results), "every rank described the same layout: no boxes exchanged"
    manifest = json.loads((root / "000000000001" / "manifest.json").read_text())
    assert manifest["world_size"] == 4


def test_each_file_has_exactly_one_writer(four_way_step: tuple[Path, Path, list[Any]]) -> None:
    root, logs, _ = four_way_step
    writers: dict[str, list[int]] = {}
    for rank in range(4):
        for key in (logs / f"writes-{rank}.txt").read_text().split():
            writers.setdefault(key, []).append(rank)
    with CheckpointManager([root]) as manager:
        every = set(manager._io[0].manifest(1).files)  # the root's files, the parts, and what each part lists
    assert set(writers) == every and {f"parts/{rank:06d}.json" for rank in range(4)} <= every
    assert {key: ranks for key, ranks in writers.items() if len(ranks) != 1} == {}
    # big_shard's shards (600 KB) are at most rank_pack_bytes: every rank wrote its own shard's chunks into its packs
    assert not [k for k in writers if k.startswith("state.zarr/big_shard/")]
    pack_writers = {writers[k][0] for k in writers if k.startswith("state.zarr/.rank_packs/")}
    assert pack_writers == {0, 1, 2, 3}
    assert all(k.startswith(f"state.zarr/.rank_packs/{writers[k][0]:06d}.") for k in writers if ".rank_packs/0" in k)
    big = Counter(writers[k][0] for k in writers if k.startswith("state.zarr/big/"))
    assert len(big) >= 2, f"replicated tensors should be spread over the ranks, not all on one: {big}"


def test_the_chunk_grid_follows_the_shards(four_way_step: tuple[Path, Path, list[Any]]) -> None:
    root, _, _ = four_way_step
    arrays = json.loads((root / "000000000001" / "manifest.json").read_text())["arrays"]
    assert arrays["w"]["chunks"] == [3, 6]  # torch's uneven Shard(0): 3, 3, 3, 1 rows
    assert arrays["x"]["chunks"] == [5, 3]  # Shard(1): 3, 3, 3, 0 columns
    assert arrays["y"]["chunks"] == [3, 4]  # 2 x 2 mesh
    assert arrays["big_shard"]["chunks"] == [50, 300]  # 500-row shards cut to <= 64 KiB, on shard boundaries


def test_restore_on_two_ranks_with_other_placements(four_way_step: tuple[Path, Path, list[Any]],
                                                    tmp_path: Path) -> None:
    root, _, _ = four_way_step
    values(run_ranks(2, f"{HERE}.restore_resharded", tmp_path, str(root)))


def test_restore_in_one_process_and_with_plain_zarr(four_way_step: tuple[Path, Path, list[Any]]) -> None:
    zarr = pytest.importorskip("zarr")
    root, _, _ = four_way_step
    expected = global_state()
    with CheckpointManager([root]) as manager:
        restored = manager.restore()
    for name in ("w", "x", "y", "rep", "big_shard"):
        assert type(restored[name]) is torch.Tensor and torch.equal(restored[name], expected[name]), name
    assert all(torch.equal(a, b) for a, b in zip(restored["small"], expected["small"], strict=True))
    group = zarr.open_group(root / "000000000001" / "state.zarr", mode="r")
    assert np.array_equal(zarr_read(group, "big_shard"), expected["big_shard"].numpy())
    assert np.array_equal(zarr_read(group, "small/0"), expected["small"][0].numpy())
    # The small shards lie in their ranks' packs (FORMAT.md, version 4), which say where in their attributes: no
    # array of their own that a plain reader would fill with zeros
    assert "w" not in group and "x" not in group
    assert np.array_equal(zarr_read(group, "w"), expected["w"].numpy())
    assert np.array_equal(zarr_read(group, "x"), expected["x"].view(torch.uint16).numpy())
    os.sync()


def _fail_writes_of(step: int, how: str) -> None:
    """Make this rank's writes of ``step`` die (SIGKILL) or fail (an OSError)."""
    import signal

    from trainio.checkpoint._tiers.local import LocalStepWriter

    write = LocalStepWriter.write

    def failing(self: Any, key: str, data: memoryview, size: int) -> None:
        if self.step == step:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(5, "injected I/O error")
        write(self, key, data, size)

    LocalStepWriter.write = failing  # type: ignore[method-assign]


def save_with_a_failing_rank(rank: int, world: int, root: str, how: str) -> dict[str, Any]:
    """Step 1 commits; rank 1's writes of step 2 die or fail; report what each survivor saw."""
    from trainio.storage import CheckpointError

    state = shard(global_state(), world, _save_placements(world))
    seen: dict[str, Any] = {}
    with CheckpointManager([root], chunk_bytes=CHUNK, timeout_s=10) as manager:
        manager.save(1, state).wait()
        if rank == 1:
            _fail_writes_of(2, how)
        handle = manager.save(2, shard(global_state(2), world, _save_placements(world)))  # new bytes: no links
        try:
            handle.wait(timeout=120)
            seen["step2"] = "committed"
        except CheckpointError as exc:
            seen["step2"] = str(exc)
        if how == "error":  # the ranks are all alive: the job goes on
            manager.save(3, state).wait()
            odd = dict(state, extra=torch.ones(3)) if rank == 1 else state
            try:
                manager.save(4, odd)
            except CheckpointError as exc:
                seen["step4"] = str(exc)
            seen["steps"] = manager.steps()[root]
    return seen


def test_a_rank_killed_mid_save_fails_the_step_on_the_survivors(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    results = run_ranks(3, f"{HERE}.save_with_a_failing_rank", tmp_path / "out", str(root), "kill")
    assert results[1] == {"ok": False, "exitcode": -9}
    survivors = values([results[0], results[2]])
    assert all(s["step2"] != "committed" for s in survivors), survivors
    for survivor in survivors:  # every survivor names the dead rank (a slow rank 2 may be named too)
        named = re.search(r"rank\(s\) \[([\d, ]+)\] did not report", survivor["step2"])
        assert named and 1 in [int(r) for r in named.group(1).split(",")], survivor
    with CheckpointManager([root]) as manager:
        assert manager.steps() == {str(root): [1]}
        assert torch.equal(manager.restore()["big_shard"], global_state()["big_shard"])
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["000000000001"]  # no leftovers of step 2


def test_a_failing_rank_fails_the_step_on_every_rank_and_the_job_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    seen = values(run_ranks(3, f"{HERE}.save_with_a_failing_rank", tmp_path / "out", str(root), "error"))
    for rank, s in enumerate(seen):
        assert "rank 1: " in s["step2"] and "injected I/O error" in s["step2"], (rank, s)
        assert "rank 1's state has other arrays" in s["step4"], (rank, s)
        assert s["steps"] == [1, 3]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["000000000001", "000000000003"]


def _model() -> Any:
    torch.manual_seed(0)
    layers = [torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True) for _ in range(2)]
    return torch.nn.Sequential(torch.nn.Linear(16, 32), *layers, torch.nn.Linear(32, 1))


def train(rank: int, world: int, root: str, start: int, stop: int, save_at: int | None) -> list[float]:
    """Train an FSDP2-sharded transformer from ``start`` to ``stop`` (restoring ``start`` first); the losses."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    with CheckpointManager([root], chunk_bytes=CHUNK, timeout_s=60) as manager:
        if start:
            for p in model.parameters():  # give the optimizer its state tensors to restore into
                p.grad = torch.zeros_like(p)
            optimizer.step()
            state = manager.restore(into={"model": model, "optim": optimizer, "step": None})
            assert state["step"] == start
        for step in range(start, stop):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 5, 16, generator=g), torch.randn(8, 5, 1, generator=g)
            rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
            loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(float(total) / world)
            if save_at == step + 1:
                manager.save(step + 1, {"model": model, "optim": optimizer, "step": step + 1}).wait()
    return losses


def test_training_resumed_on_another_world_size_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    straight = values(run_ranks(2, f"{HERE}.train", tmp_path / "a", root, 0, 6, 3))[0]
    resumed = values(run_ranks(4, f"{HERE}.train", tmp_path / "b", root, 3, 6, None))[0]
    assert len(straight) == 6 and straight[0] > straight[-1]
    assert resumed == pytest.approx(straight[3:], rel=1e-5, abs=1e-7)
    manifest = json.loads((tmp_path / "ckpt" / "000000000003" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert any(path.startswith("optim/state/") and "exp_avg" in path for path in manifest["arrays"])


def save_on_two_tiers(rank: int, world: int, fast: str, slow: str) -> dict[str, Any]:
    """Three steps through a fast tier keeping one and a slow tier; count this rank's promotions."""
    from trainio.checkpoint import Tier
    from trainio.checkpoint._tiers.tier_set import TierSet

    copies = []
    copy_to = TierSet._copy_to

    def counted(self: TierSet, target: int, step: int) -> Any:
        copies.append(step)
        return copy_to(self, target, step)

    TierSet._copy_to = counted  # type: ignore[method-assign]
    with CheckpointManager([Tier(fast, keep_last=1), Tier(slow)], chunk_bytes=CHUNK, timeout_s=60) as manager:
        for step in (1, 2, 3):
            manager.save(step, shard(global_state(step), world, _save_placements(world)))
        manager.wait()
        manager.promote()
        restored = manager.restore(2, tiers=[slow])
    assert torch.equal(restored["w"], global_state(2)["w"])
    return {"copies": copies}


def test_promotion_and_retention_run_once_on_rank_zero(tmp_path: Path) -> None:
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    seen = values(run_ranks(2, f"{HERE}.save_on_two_tiers", tmp_path / "out", str(fast), str(slow)))
    assert sorted(seen[0]["copies"]) == [1, 2, 3] and seen[1]["copies"] == []
    with CheckpointManager([fast, slow]) as manager:
        assert manager.steps() == {str(fast): [3], str(slow): [1, 2, 3]}


def save_to(rank: int, world: int, url: str, compression: str | None) -> None:
    """Save the sharded state as step 1 to ``url``."""
    with CheckpointManager([url], chunk_bytes=CHUNK, timeout_s=60, compression=compression) as manager:
        manager.save(1, shard(global_state(), world, _save_placements(world))).wait()


def test_ranks_save_a_compressed_step_to_s3_and_restore_it_resharded(s3_url: str, tmp_path: Path) -> None:
    values(run_ranks(4, f"{HERE}.save_to", tmp_path / "save", s3_url, "zstd"))
    values(run_ranks(2, f"{HERE}.restore_resharded", tmp_path / "restore", s3_url))
    expected = global_state()
    with CheckpointManager([s3_url]) as manager:
        assert manager.steps() == {s3_url: [1]}
        restored = manager.restore()
        assert manager._io[0].manifest(1).arrays["big_shard"].codec == "zstd:3"
    for name in ("w", "x", "y", "big_shard"):
        assert torch.equal(restored[name], expected[name]), name
