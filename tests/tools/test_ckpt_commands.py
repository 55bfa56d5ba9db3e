"""``trainio ckpt``: ls, verify, promote, gc, show — for people and with --json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager, Tier
from trainio.tools._cli import main


@pytest.fixture
def tier(tmp_path: Path) -> Path:
    root = tmp_path / "fast"
    with CheckpointManager([Tier(root)]) as manager:
        for step in (10, 20, 30):
            manager.save(step, {"w": np.full((64, 64), step, np.float32), "lr": 0.5, "names": ["a", "b"],
                                "opt": {0: {"m": np.zeros(3)}}})
    return root


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_ls_lists_steps_of_each_tier(tier: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _json(capsys, "ckpt", "ls", str(tier))
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert all(r["bytes"] > 64 * 64 * 4 and r["files"] > 3 and not r["error"] for r in rows)
    assert main(["ckpt", "ls", str(tier)]) == 0
    out = capsys.readouterr().out
    assert "committed" in out and str(tier) in out


def test_verify_passes_then_names_a_damaged_file(tier: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(capsys, "ckpt", "verify", str(tier))
    assert doc["ok"] and doc["steps"] == [10, 20, 30]
    chunk = tier / "000000000020" / "state.zarr" / ".packed" / "c.0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x10
    chunk.write_bytes(bytes(data))
    assert main(["ckpt", "verify", str(tier), "--step", "20"]) == 1
    err = capsys.readouterr().err
    assert "step 20: state.zarr/.packed/c.0" in err and "xxh3-128" in err
    assert _json(capsys, "ckpt", "ls", str(tier))[1]["verified"] is False


def test_promote_then_gc(tier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "slow"
    doc = _json(capsys, "ckpt", "promote", str(tier), str(target), "--step", "20")
    assert doc["step"] == 20
    assert main(["ckpt", "verify", str(target)]) == 0
    capsys.readouterr()
    dry = _json(capsys, "ckpt", "gc", str(tier), "--keep-last", "1", "--dry-run")
    assert dry["deleted"] == [10, 20]
    assert [r["step"] for r in _json(capsys, "ckpt", "ls", str(tier))] == [10, 20, 30]
    _json(capsys, "ckpt", "gc", str(tier), "--keep-last", "1")
    assert [r["step"] for r in _json(capsys, "ckpt", "ls", str(tier))] == [30]
    assert main(["ckpt", "gc", str(tier)]) == 1
    assert "--keep-last" in capsys.readouterr().err


def test_show_describes_the_tree(tier: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(capsys, "ckpt", "show", str(tier), "--step", "10")
    nodes = {tuple(n["keys"]): n for n in doc["nodes"]}
    assert nodes[("w",)]["shape"] == [64, 64] and nodes[("w",)]["dtype"] == "float32"
    assert nodes[("lr",)]["value"] == 0.5
    assert nodes[("opt", 0, "m")]["dtype"] == "float64"
    assert main(["ckpt", "show", str(tier)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("step 30") and "float32[64, 64]" in out and "names: list of 2" in out


def test_verifying_an_empty_tier_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ckpt", "verify", str(tmp_path)]) == 1
    assert "no committed step to verify" in capsys.readouterr().err


def test_missing_step_is_a_one_line_error(tier: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ckpt", "show", str(tier), "--step", "99"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 99 is not committed" in err


_VERIFY_UNDER_FSIZE_0 = """
import resource, signal, sys
from trainio.tools._cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
sys.exit(main(["ckpt", "verify", sys.argv[1]]))
"""


def test_verify_on_a_tier_that_cannot_be_written_still_reports_every_file(tier: Path) -> None:
    """A full tier (no file may grow) is verified, says what it could not record, and leaves nothing behind."""
    import subprocess
    import sys

    before = sorted(p.name for p in tier.iterdir())
    done = subprocess.run([sys.executable, "-c", _VERIFY_UNDER_FSIZE_0, str(tier)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 step(s)" in done.stdout and "verified" in done.stdout
    assert "warning" in done.stderr and "last_known_good.json" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tier.iterdir()) == before  # no temp file left
