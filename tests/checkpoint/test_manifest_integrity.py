"""The manifest is believed only once its seal checks out, and each tier's files are checked against its own."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager, Tier, list_steps, verify_checkpoint
from trainio.checkpoint._format.manifest import Manifest
from trainio.storage import SEAL_FIELD, CheckpointError, FormatError, IntegrityError, load_sealed

from .._bit_flips import bit_flips

STEP = "000000000005"


def _state() -> dict[str, object]:
    return {"model": {"w": np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "b": np.ones(5, np.float64),
                      "big": np.arange(300 * 300, dtype=np.float32).reshape(300, 300)},
            "optimizer": {"lr": 0.001, "step": 5}, "data": {"consumed": 250, "epoch": 1}, "name": "run"}


def _assert_state(restored: dict[str, object]) -> None:
    expected = _state()
    assert restored["optimizer"] == expected["optimizer"] and restored["data"] == expected["data"]
    assert restored["name"] == "run"
    for key in ("w", "b", "big"):
        np.testing.assert_array_equal(restored["model"][key], expected["model"][key])  # type: ignore[index]


def _two_tiers(root: Path) -> list[Tier]:
    return [Tier(root / "fast"), Tier(root / "slow")]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    with CheckpointManager(_two_tiers(tmp_path)) as manager:
        manager.save(5, _state())
        manager.promote()
    return tmp_path


def test_every_bit_flip_of_a_manifest_is_refused_or_harmless(saved: Path) -> None:
    data = (saved / "fast" / STEP / "manifest.json").read_bytes()
    original = Manifest.from_bytes(data, "fast", "manifest.json")
    for position in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            try:
                parsed = Manifest.from_bytes(bytes(damaged), "fast", "manifest.json")
            except FormatError:
                continue
            assert parsed == original, f"flipping bit {bit} of byte {position} changed the manifest unnoticed"


def test_the_same_manifest_bytes_are_validated_once_and_any_other_bytes_again(saved: Path) -> None:
    data = (saved / "fast" / STEP / "manifest.json").read_bytes()
    first = Manifest.from_bytes(data, "fast", "manifest.json")
    assert Manifest.from_bytes(bytes(data), "slow", "manifest.json") is first
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 4
    with pytest.raises(FormatError, match="damaged"):
        Manifest.from_bytes(bytes(damaged), "fast", "manifest.json")


@pytest.mark.parametrize("name", ["manifest.json", "parts/000000.json"])
def test_a_damaged_manifest_or_part_falls_back_to_the_next_tiers_own(saved: Path, name: str) -> None:
    path = saved / "fast" / STEP / name
    good = path.read_bytes()
    rng = random.Random(19)
    for _ in range(10):
        damaged = bytearray(good)
        damaged[rng.randrange(len(good))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        with CheckpointManager(_two_tiers(saved)) as manager:
            restored, report = manager.restore_with_report(5)
        _assert_state(restored)
        assert any(name in key or name in why for key, why in report.fell_back.items()), report.fell_back
        found = verify_checkpoint(saved / "fast")
        assert not found.ok and name in str(found.problems)
        assert name != "manifest.json" or not any(info.verified for info in list_steps(saved / "fast"))
    path.write_bytes(good)
    assert verify_checkpoint(saved / "fast").ok


def test_each_tier_is_read_against_its_own_manifest(saved: Path) -> None:
    """Tier 1's manifest is unreadable: tier 2's files are checked against tier 2's manifest, not refused."""
    (saved / "fast" / STEP / "manifest.json").write_bytes(b"{}")
    chunk = next(p for p in (saved / "fast" / STEP).rglob("c*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(bytes(len(chunk.read_bytes())))  # zeroed: only the slow tier's copy is good
    with CheckpointManager(_two_tiers(saved)) as manager:
        restored, report = manager.restore_with_report(5)
    _assert_state(restored)
    fast = str(saved / "fast")
    assert list(report.fell_back) == [f"{fast}:manifest.json"]
    assert "seal" in report.fell_back[f"{fast}:manifest.json"]


def test_a_file_damaged_on_the_fast_tier_is_read_from_the_slow_one_and_named(saved: Path) -> None:
    chunk = next(p for p in (saved / "fast" / STEP).rglob("c*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 1
    chunk.write_bytes(bytes(raw))
    with CheckpointManager(_two_tiers(saved)) as manager:
        restored, report = manager.restore_with_report(5)
    _assert_state(restored)
    assert [key.rsplit(":", 1)[0] for key in report.fell_back] == [str(saved / "fast")]


def _as_whole_version(saved: Path) -> Path:
    """Rewrite the fast tier's step as version 2 wrote it: every file in the one manifest, no parts."""
    io = CheckpointManager([saved / "fast"])
    bound = io._io[0].manifest(5)
    io.close()
    files = {key: entry for key, entry in bound.files.items() if not key.startswith("parts/")}
    path = saved / "fast" / STEP / "manifest.json"
    path.write_bytes(replace(bound, files=files, parts=None, writers={}, meshes=[], totals=None).to_bytes())
    shutil.rmtree(saved / "fast" / STEP / "parts")
    return path


def test_a_version_2_step_is_still_read_and_promoted_as_it_is(saved: Path) -> None:
    path = _as_whole_version(saved)
    assert json.loads(path.read_bytes())["version"] == 2
    shutil.rmtree(saved / "slow")
    with CheckpointManager(_two_tiers(saved)) as manager:
        _assert_state(manager.restore(5))
        manager.promote()
    assert json.loads((saved / "slow" / STEP / "manifest.json").read_bytes())["version"] == 2
    assert verify_checkpoint(saved / "slow").ok
    with CheckpointManager([saved / "slow"]) as manager:
        _assert_state(manager.restore(5))


def test_every_bit_flip_of_a_part_manifest_is_refused(saved: Path) -> None:
    part = saved / "fast" / STEP / "parts" / "000000.json"
    data = part.read_bytes()
    manager = CheckpointManager([saved / "fast"])
    chunk = next(k for k in json.loads(data)["files"] if "/big/" in k)
    try:
        for damaged in bit_flips(data):
            part.write_bytes(damaged)
            with pytest.raises(IntegrityError):
                manager._io[0].manifest(5).files[chunk]
    finally:
        manager.close()
    part.write_bytes(data)


def test_a_version_1_manifest_without_a_seal_is_still_read(saved: Path) -> None:
    path = _as_whole_version(saved)
    document = load_sealed(path.read_bytes(), "fast", "manifest.json")
    document["version"] = 1
    path.write_bytes(json.dumps(document, separators=(",", ":")).encode())
    shutil.rmtree(saved / "slow")
    with CheckpointManager([saved / "fast"]) as manager:
        _assert_state(manager.restore(5))


def test_a_version_2_manifest_without_its_seal_is_refused(saved: Path) -> None:
    path = saved / "fast" / STEP / "manifest.json"
    document = json.loads(path.read_bytes())
    del document[SEAL_FIELD]
    path.write_bytes(json.dumps(document, separators=(",", ":")).encode())
    with pytest.raises(FormatError, match="seal"):
        Manifest.from_bytes(path.read_bytes(), "fast", "manifest.json")
    shutil.rmtree(saved / "slow")
    with CheckpointManager([saved / "fast"]) as manager, pytest.raises(CheckpointError, match="seal"):
        manager.restore(5)
