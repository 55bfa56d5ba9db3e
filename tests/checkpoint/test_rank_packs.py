"""Rank packs (format version 4): the small shards of sharded arrays lie in one file per rank, not a file each."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager, Tier, verify_checkpoint
from trainio.checkpoint._format.checks import FileEntry
from trainio.checkpoint._format.parts import parse_part, part_bytes, rank_pack_key
from trainio.storage import CheckpointError, FormatError, load_sealed, seal_json

from .._bit_flips import bit_flips
from ._ranks import run_ranks, values
from .test_format import zarr_read

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.tensor")

HERE = "tests.checkpoint.test_rank_packs"
STEP = "000000000001"
SMALL = ("norm", "bias")  # 64 and 48 elements: 128 and 96 bytes a rank, in the rank packs
BIG = "w"  # 256 x 512 float32: 256 KiB a rank, more than rank_pack_bytes: chunk files of its own


def full_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {"norm": torch.randn(64, generator=g), "bias": torch.randn(48, generator=g).to(torch.bfloat16),
            BIG: torch.randn(256, 512, generator=g), "rep": torch.randn(8, generator=g), "step": 1}


def _sharded(state: dict[str, Any], world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    return {k: distribute_tensor(v, mesh, [Shard(0)]) if k in (*SMALL, BIG) else v for k, v in state.items()}


def save_and_restore(rank: int, world: int, root: str) -> dict[str, Any]:
    """Save the sharded state to a fast and a slow tier, restore it into fresh DTensors: what was read."""
    expected = full_state()
    tiers = [Tier(f"{root}/fast"), Tier(f"{root}/slow")]
    with CheckpointManager(tiers, pack_bytes=1024, rank_pack_bytes=1024, timeout_s=60) as manager:
        manager.save(1, _sharded(expected, world)).wait()
        manager.promote()
        target = _sharded({k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v
                           for k, v in expected.items()}, world)
        restored, report = manager.restore_with_report(into=target)
    same = all(torch.equal(restored[k].full_tensor(), expected[k]) for k in (*SMALL, BIG))
    return {"same": same, "files": report.files, "fell_back": report.fell_back}


def restore_sharded(rank: int, world: int, root: str) -> dict[str, Any]:
    expected = full_state()
    with CheckpointManager([Tier(f"{root}/fast"), Tier(f"{root}/slow")], timeout_s=60) as manager:
        target = _sharded({k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v
                           for k, v in expected.items()}, world)
        restored, report = manager.restore_with_report(into=target)
    return {"same": all(torch.equal(restored[k].full_tensor(), expected[k]) for k in (*SMALL, BIG)),
            "fell_back": sorted(report.fell_back)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("rank-packs")
    return root, values(run_ranks(2, f"{HERE}.save_and_restore", root / "out", str(root)))


@pytest.mark.slow
def test_small_shards_lie_in_one_pack_a_rank_and_restore_in_place(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    root, results = saved
    assert all(r["same"] and not r["fell_back"] for r in results)
    step = root / "fast" / STEP
    packs = step / "state.zarr" / ".rank_packs"
    assert sorted(p.relative_to(packs).as_posix() for p in packs.rglob("*") if p.is_file()) == [
        "000000.0/c.0", "000000.0/zarr.json", "000001.0/c.0", "000001.0/zarr.json", "zarr.json"]
    assert not any((step / "state.zarr" / name).exists() for name in SMALL), "no files, and no zarr.json, of their own"
    assert (step / "state.zarr" / BIG / "zarr.json").is_file()
    manifest = json.loads((step / "manifest.json").read_bytes())
    assert manifest["version"] == 4 and all(manifest["arrays"][name]["ranked"] for name in SMALL)
    assert "ranked" not in manifest["arrays"][BIG]
    part = load_sealed((step / "parts" / "000001.json").read_bytes(), "test", "part")
    assert part["version"] == 4 and sorted(part["members"]) == ["state.zarr/bias/c.1", "state.zarr/norm/c.1"]
    zarr = pytest.importorskip("zarr")
    group = zarr.open_group(step / "state.zarr", mode="r")  # a plain zarr reader finds them through the packs
    expected = full_state()
    assert all(np.array_equal(zarr_read(group, name), expected[name].view(torch.uint16 if name == "bias" else
                                                                          torch.float32).numpy()) for name in SMALL)
    # each rank read its part, its pack and its chunk of w (the root's files need not be read): three files
    assert [r["files"] for r in results] == [3, 3]


@pytest.mark.slow
def test_a_whole_restore_in_one_process_reads_every_ranks_pack(saved: tuple[Path, list[dict[str, Any]]]) -> None:
    root, _ = saved
    with CheckpointManager([Tier(root / "fast")]) as manager:
        restored = manager.restore()
    expected = full_state()
    assert all(torch.equal(restored[k], expected[k]) for k in (*SMALL, BIG, "rep"))
    assert verify_checkpoint(root / "fast").ok


@pytest.mark.slow
def test_the_ranked_arrays_reads_are_worked_out_while_the_other_files_are_read(
        saved: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch) -> None:
    from trainio.checkpoint._restore.step_reader import StepReader
    from trainio.checkpoint._tiers.local import LocalTierIO

    root, _ = saved
    big_read = threading.Event()
    read_into, plan_later = LocalTierIO.read_into, StepReader._plan_later

    def reading(self: LocalTierIO, step: int, key: str, entry: FileEntry, target: memoryview) -> None:
        read_into(self, step, key, entry, target)
        if key.startswith(f"state.zarr/{BIG}/c."):
            big_read.set()

    planned: list[str] = []

    def planning(self: StepReader, load: Any, *handing: Any) -> Any:
        assert big_read.wait(10), "the ranked arrays were worked out before any other file was read"
        planned.extend(path for path, _ in load.later)
        return plan_later(self, load, *handing)

    monkeypatch.setattr(LocalTierIO, "read_into", reading)
    monkeypatch.setattr(StepReader, "_plan_later", planning)
    with CheckpointManager([Tier(root / "fast")]) as manager:
        restored, report = manager.restore_with_report()
    expected = full_state()
    assert all(torch.equal(restored[k], expected[k]) for k in (*SMALL, BIG, "rep"))
    assert not report.fell_back
    assert sorted(planned) == sorted(SMALL)
    state = root / "fast" / STEP / "state.zarr"
    read = [*(state / BIG).glob("c.*"), *(state / ".rank_packs").glob("*/c.0"), state / ".packed" / "c.0"]
    assert report.files == len(read) == 5  # each once: the big array's chunks, both ranks' packs, the step's pack


@pytest.mark.slow
def test_a_flipped_bit_in_a_rank_pack_falls_back_and_is_named(saved: tuple[Path, list[dict[str, Any]]],
                                                              tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(saved[0], root, ignore=shutil.ignore_patterns("out"))
    pack = root / "fast" / STEP / "state.zarr" / ".rank_packs" / "000001.0" / "c.0"
    data = bytearray(pack.read_bytes())
    data[5] ^= 0x10
    pack.write_bytes(bytes(data))
    results = values(run_ranks(2, f"{HERE}.restore_sharded", tmp_path / "out", str(root)))
    assert all(r["same"] for r in results)
    assert [name.rsplit("/fast:", 1)[1] for name in results[1]["fell_back"]] == ["state.zarr/.rank_packs/000001.0/c.0"]
    problems = verify_checkpoint(root / "fast").problems
    assert [key for _, key, _ in problems] == ["state.zarr/.rank_packs/000001.0/c.0"]
    with CheckpointManager([Tier(root / "fast"), Tier(root / "slow")]) as manager:
        restored, report = manager.restore_with_report(repair=True)  # in one process: every rank's pack
    assert all(torch.equal(restored[k], full_state()[k]) for k in (*SMALL, BIG)) and report.fell_back
    assert verify_checkpoint(root / "fast").ok, "the damaged pack is rewritten from the slow tier's"
    pack.write_bytes(bytes(data))
    shutil.rmtree(root / "slow")
    with CheckpointManager([Tier(root / "fast")]) as manager, \
            pytest.raises(CheckpointError, match=r"\.rank_packs/000001\.0/c\.0.*damaged or missing on every tier"):
        manager.restore()


def _pack(size: int) -> dict[str, FileEntry]:
    return {rank_pack_key(1, 0): FileEntry(size, "0" * 32)}


@pytest.mark.parametrize("members, problem", [
    ({"state.zarr/a/c.1": (0, 0, 200)}, "beyond the end of pack 0"),
    ({"state.zarr/a/c.1": (1, 0, 8)}, "lies in pack 1, which the part does not list"),
    ({"state.zarr/a/c.1": (0, 0, 64), "state.zarr/b/c.1": (0, 32, 64)}, "members overlap"),
    ({"../x": (0, 0, 8)}, "not a valid relative key"),
])
def test_a_part_whose_members_lie_outside_their_pack_is_refused(members: dict[str, tuple[int, int, int]],
                                                                problem: str) -> None:
    document = part_bytes(1, 1, _pack(128), members)
    with pytest.raises(FormatError, match=problem):
        parse_part(document, "test", "parts/000001.json", 1, 1)


def test_members_are_only_read_from_a_version_4_part() -> None:
    document = load_sealed(part_bytes(1, 1, _pack(128), {"state.zarr/a/c.1": (0, 0, 8)}), "test", "part")
    document["version"] = 3
    with pytest.raises(FormatError, match="a version-3 part has no members"):
        parse_part(seal_json(document), "test", "parts/000001.json", 1, 1)
    assert parse_part(part_bytes(1, 1, _pack(128), {"state.zarr/a/c.1": (0, 8, 8)}), "test", "p", 1, 1).members == \
        {"state.zarr/a/c.1": (0, 8, 8)}


def _reseal_as(path: Path, edit: Any) -> None:
    document = load_sealed(path.read_bytes(), "test", "manifest.json")
    edit(document)
    path.write_bytes(seal_json(document))


def test_a_version_3_step_is_still_read_and_cannot_claim_ranked_arrays(tmp_path: Path) -> None:
    """A step without ranked arrays is what version 3 wrote (a root and parts): it restores as it did."""
    state = {"w": torch.randn(300, 300), "b": torch.randn(10)}
    with CheckpointManager([tmp_path]) as manager:
        manager.save(1, state).wait()
    manifest = tmp_path / STEP / "manifest.json"
    _reseal_as(manifest, lambda d: d.update(version=3))
    with CheckpointManager([tmp_path]) as manager:
        restored = manager.restore(1)
    assert torch.equal(restored["w"], state["w"]) and torch.equal(restored["b"], state["b"])

    def claim(document: dict[str, Any]) -> None:
        document["arrays"]["w"]["ranked"] = True
    _reseal_as(manifest, claim)
    with CheckpointManager([tmp_path]) as manager, pytest.raises(CheckpointError, match="ranked must be true or absent"):
        manager.restore(1)


def test_a_rank_pack_without_its_zarr_json_is_incomplete() -> None:
    """Every part read together must list each pack's chunk and its zarr.json (what other zarr readers go by)."""
    from trainio.checkpoint._format.checks import Checks
    from trainio.checkpoint._format.parts import rank_pack_path
    from trainio.checkpoint._format.zarr_layout import ArraySpec

    arrays = {"b": ArraySpec("b", "torch", "float32", "float32", (8,), (4,), ranked=True)}
    members = {"state.zarr/b/c.0": 16, "state.zarr/b/c.1": 16}
    pack, metadata = rank_pack_key(0, 0), f"{rank_pack_path(0, 0)}/zarr.json"
    files = {"state.zarr/zarr.json": FileEntry(1, "0" * 32), "state.zarr/.rank_packs/zarr.json": FileEntry(1, "0" * 32),
             pack: FileEntry(32, "0" * 32), metadata: FileEntry(1, "0" * 32)}
    Checks("test", "parts").layout(arrays, files, None, members, [pack, metadata])
    del files[metadata]
    with pytest.raises(FormatError, match="lacks 1 file"):
        Checks("test", "parts").layout(arrays, files, None, members, [pack, metadata])
    with pytest.raises(FormatError, match="members and the ranked arrays' chunks differ"):
        Checks("test", "parts").layout(arrays, {**files, metadata: FileEntry(1, "0" * 32)}, None,
                                       {"state.zarr/b/c.0": 16}, [pack, metadata])


@pytest.mark.slow
def test_every_bit_flip_of_a_part_with_members_is_refused(saved: tuple[Path, list[dict[str, Any]]],
                                                         tmp_path: Path) -> None:
    """Where a rank pack's chunks lie is believed only from a part whose bytes match the root's digest."""
    import shutil

    from trainio.storage import IntegrityError

    root = tmp_path / "copy"
    shutil.copytree(saved[0] / "fast", root)
    part = root / STEP / "parts" / "000001.json"
    data = part.read_bytes()
    assert b'"members"' in data
    with CheckpointManager([Tier(root)]) as manager:
        for damaged in bit_flips(data):
            part.write_bytes(damaged)
            with pytest.raises(IntegrityError):
                manager._io[0].manifest(1).files.member("state.zarr/norm/c.1")  # type: ignore[attr-defined]
        part.write_bytes(data)
        assert manager._io[0].manifest(1).files.member("state.zarr/norm/c.1")[0].endswith("000001.0/c.0")
