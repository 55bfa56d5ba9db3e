"""FIFOs, deep JSON, absurd sizes and symlinks in a tier: clean errors naming the file, fallback to a good tier.

Every case runs under a timeout mark: a hang fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager, Tier, list_steps, read_manifest, verify_checkpoint
from trainio.storage import CheckpointError, FormatError, load_sealed, seal_json
from trainio.tools._cli import main

STEP = "000000000005"


def _state() -> dict[str, Any]:
    return {"w": np.arange(512 * 256, dtype=np.float32).reshape(512, 256), "small": np.ones(4), "lr": 0.5}


pytestmark = pytest.mark.timeout(120)  # a hang fails the test instead of the suite


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    with CheckpointManager([Tier(tmp_path / "fast"), Tier(tmp_path / "slow")]) as manager:
        manager.save(5, _state())
        manager.promote()
    return tmp_path


def _restore(root: Path, **options: Any) -> Any:
    with CheckpointManager([Tier(root / "fast"), Tier(root / "slow")]) as manager:
        return manager.restore_with_report(5, **options)


def _assert_state(state: dict[str, Any]) -> None:
    np.testing.assert_array_equal(state["w"], _state()["w"])
    np.testing.assert_array_equal(state["small"], _state()["small"])
    assert state["lr"] == 0.5


def _fifo_in_place_of(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _chunk(root: Path) -> Path:
    return next(p for p in (root / "fast" / STEP / "state.zarr" / "w").rglob("*") if p.is_file()
                and p.name != "zarr.json")


@pytest.mark.parametrize("which", ["chunk", "zarr.json", "manifest.json"])
def test_a_fifo_in_a_step_falls_back_to_the_next_tier(saved: Path, which: str) -> None:
    target = {"chunk": _chunk(saved), "zarr.json": saved / "fast" / STEP / "state.zarr" / "w" / "zarr.json",
              "manifest.json": saved / "fast" / STEP / "manifest.json"}[which]
    _fifo_in_place_of(target)
    state, report = _restore(saved)
    _assert_state(state)
    checked = verify_checkpoint(saved / "fast")
    if which == "manifest.json":  # no regular manifest: the step is not committed on that tier at all
        assert checked.steps == [] and list_steps(saved / "fast") == []
        return
    if which == "zarr.json":  # a raw array's: the manifest says all its bytes mean, restore never opens it
        assert not report.fell_back
    else:
        assert any("not a regular file" in problem for problem in report.fell_back.values())
    assert not checked.ok and "not a regular file" in checked.problems[0][2]


def test_a_damaged_zarr_json_of_a_compressed_array_is_read_from_the_next_tier(tmp_path: Path) -> None:
    """zarr decodes a compressed array from its zarr.json, so restore reads and checks that one."""
    with CheckpointManager([Tier(tmp_path / "fast"), Tier(tmp_path / "slow")], compression="zstd") as manager:
        manager.save(5, _state())
        manager.promote()
    metadata = tmp_path / "fast" / STEP / "state.zarr" / "w" / "zarr.json"
    data = bytearray(metadata.read_bytes())
    data[10] ^= 1
    metadata.write_bytes(bytes(data))
    state, report = _restore(tmp_path)
    _assert_state(state)
    assert any("w/zarr.json" in key for key in report.fell_back), report.fell_back


def test_a_fifo_stops_promote_with_a_clean_error(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fifo_in_place_of(_chunk(saved))
    shutil.rmtree(saved / "slow")
    code = main(["ckpt", "promote", str(saved / "fast"), str(saved / "other")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "not a regular file" in err and "Traceback" not in err
    assert not (saved / "other" / STEP / "manifest.json").exists()


def _deep_manifest(saved: Path) -> None:
    depth = 5000
    (saved / "fast" / STEP / "manifest.json").write_bytes(b'{"tree":' + b"[" * depth + b"]" * depth + b"}")


def _huge_size_manifest(saved: Path, size: int) -> None:
    path = saved / "fast" / STEP / "manifest.json"
    document = load_sealed(path.read_bytes(), "fast", "manifest.json")
    key = next(k for k in document["files"] if k.endswith("zarr.json"))
    document["files"][key]["size"] = size
    path.write_bytes(seal_json(document))  # forged, with a seal that matches: the validation must still hold


@pytest.mark.parametrize("damage", ["deep", "size 10**15", "size 10**11"])
def test_hostile_manifests_are_clean_errors_everywhere(saved: Path, damage: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    if damage == "deep":
        _deep_manifest(saved)
    else:
        _huge_size_manifest(saved, 10**15 if damage == "size 10**15" else 10**11)
    state, _ = _restore(saved)
    _assert_state(state)
    fast = str(saved / "fast")
    for argv in (["ckpt", "verify", fast], ["ckpt", "ls", fast], ["ckpt", "show", fast, "--step", "5"],
                 ["ckpt", "promote", fast, str(saved / "other"), "--step", "5"]):
        code = main(argv)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and "RecursionError" not in captured.err, argv
        if argv[1] in ("verify", "promote") or damage != "size 10**11" and argv[1] == "show":
            assert code != 0 and captured.err.count("\n") == 1, argv
    rows = list_steps(saved / "fast")
    if damage == "size 10**11":  # a valid manifest whose file is not that size: found by verify, never verified
        assert not verify_checkpoint(saved / "fast").ok
    else:
        assert rows[0].error and not rows[0].verified
        with pytest.raises(FormatError):
            read_manifest(saved / "fast", 5)


def test_repair_never_writes_through_a_link_out_of_the_tier(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    step_dir = saved / "fast" / STEP / "state.zarr" / "w"
    shutil.copytree(step_dir, outside / "w")
    for chunk in (outside / "w").rglob("*"):
        if chunk.is_file() and chunk.name != "zarr.json":
            chunk.write_bytes(bytes(len(chunk.read_bytes())))  # damaged, so repair would rewrite it
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    shutil.rmtree(step_dir)
    os.symlink(outside / "w", step_dir)
    state, report = _restore(saved, repair=True)
    _assert_state(state)
    assert any("out of the store's root" in problem for problem in report.fell_back.values())
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before
    assert not report.repaired


def test_a_link_out_of_the_tier_is_not_read_even_when_its_bytes_are_right(saved: Path,
                                                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    step_dir = saved / "fast" / STEP / "state.zarr" / "w"
    shutil.copytree(step_dir, outside / "w")
    shutil.rmtree(step_dir)
    os.symlink(outside / "w", step_dir)
    shutil.rmtree(saved / "slow")
    with CheckpointManager([Tier(saved / "fast")]) as manager, pytest.raises(CheckpointError,
                                                                              match="out of the store's root"):
        manager.restore(5)


def test_a_last_known_good_record_with_a_flipped_bit_counts_as_absent(saved: Path) -> None:
    assert verify_checkpoint(saved / "fast").ok
    marker = saved / "fast" / "last_known_good.json"
    good = marker.read_bytes()
    assert list_steps(saved / "fast")[0].verified
    for position in range(len(good)):
        damaged = bytearray(good)
        damaged[position] ^= 0x04
        marker.write_bytes(bytes(damaged))
        assert list_steps(saved / "fast")[0].verified is False, position
    marker.write_bytes(b'{"step": 1}')  # what trainio wrote before the seal: not believed either
    assert list_steps(saved / "fast")[0].verified is False


def test_last_known_good_that_is_deep_or_a_fifo_is_ignored(saved: Path) -> None:
    marker = saved / "fast" / "last_known_good.json"
    marker.write_bytes(b"[" * 5000 + b"]" * 5000)
    assert list_steps(saved / "fast")[0].verified is False
    marker.unlink()
    os.mkfifo(marker)
    assert list_steps(saved / "fast")[0].verified is False
    assert json.loads((saved / "slow" / STEP / "manifest.json").read_bytes())["version"] == 4


def test_a_local_tier_names_no_file_through_a_link_out_of_it(tmp_path: Path) -> None:
    """What kvikio would open by path: a file of the tier, never one reached through a link out of it."""
    tier = tmp_path / "tier"
    with CheckpointManager([tier]) as manager:
        manager.save(1, _state()).wait()
        io = manager._io[0]
        key = next(p for p in (tier / "000000000001" / "state.zarr" / "w").iterdir() if p.name != "zarr.json")
        relative = key.relative_to(tier / "000000000001").as_posix()
        assert io.local_file(1, relative) == os.path.realpath(key)
        shutil.move(tier / "000000000001", tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", tier / "000000000001")
        assert io.local_file(1, relative) is None


def test_the_read_ahead_of_small_files_passes_over_hostile_ones_without_blocking(saved: Path, tmp_path: Path) -> None:
    from trainio.checkpoint._tiers import open_tier_io
    from trainio.storage import open_store

    chunk = _chunk(saved)
    _fifo_in_place_of(chunk)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 100)
    (saved / "fast" / STEP / "link.bin").symlink_to(outside)
    tier = open_tier_io(open_store(saved / "fast"), "fast")
    tier.advise(5, [str(chunk.relative_to(saved / "fast" / STEP)), "link.bin", "missing.bin", "../../x",
                    "manifest.json"])  # returns: nothing opened blocks, nothing raises
    state, report = _restore(saved)  # and the restore, which advises too, still falls back past the FIFO
    _assert_state(state)
    assert any("not a regular file" in problem for problem in report.fell_back.values())
