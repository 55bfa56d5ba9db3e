"""The ``trainio`` command's frame, and the package as users install it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import trainio.tools
from trainio.tools._cli import main


def _trainio() -> list[str]:
    script = Path(sys.executable).parent / "trainio"
    return [str(script)] if script.exists() else [sys.executable, "-m", "trainio.tools"]


@pytest.mark.slow
def test_version_and_help_from_the_console_script() -> None:
    version = subprocess.run([*_trainio(), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("trainio 0.")
    helped = subprocess.run([*_trainio(), "--help"], capture_output=True, text=True, check=True)
    assert "usage: trainio" in helped.stdout and "storage layer" in helped.stdout


def test_python_dash_m_runs_the_same_command() -> None:
    out = subprocess.run([sys.executable, "-m", "trainio.tools", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("trainio ")


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "usage: trainio" in capsys.readouterr().out


def test_unknown_command_is_a_one_line_usage_error() -> None:
    out = subprocess.run([*_trainio(), "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "invalid choice" in out.stderr and "Traceback" not in out.stderr


def test_public_api_is_main_and_the_shard_twins() -> None:
    assert trainio.tools.__all__ == ["ShardOptions", "ShardTaskFailed", "main", "shard", "shard_with_ray"]


@pytest.mark.slow
def test_a_regular_wheel_maps_the_four_folders_into_trainio(tmp_path: Path, repo_root: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(repo_root)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("trainio-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("storage", "loaders", "checkpoint", "tools"):
        assert f"trainio/{package}/__init__.py" in names
        assert f"trainio/{package}/py.typed" in names
    assert not any(n.split("/")[0] in ("storage", "loaders", "checkpoint", "tools", "tests", "benchmarks")
                   for n in names), "nothing generic may land at the top of site-packages"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "trainio = trainio.tools:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_importing_trainio_does_not_import_torch() -> None:
    code = ("import sys, trainio.storage, trainio.loaders, trainio.checkpoint, trainio.tools; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "torch must stay an optional, lazy import"
