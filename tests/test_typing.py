"""The library type-checks under mypy --strict (house rule R15)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` is the quick lane; .ci/run runs everything

PACKAGES = ("storage", "loaders", "checkpoint", "tools")


def test_mypy_strict(tmp_path: Path, repo_root: Path) -> None:
    pytest.importorskip("mypy")
    # mypy resolves trainio.<package> through a tree shaped like the installed package.
    shim = tmp_path / "trainio"
    shim.mkdir()
    for package in PACKAGES:
        (shim / package).symlink_to(repo_root / package)
    args = [arg for package in PACKAGES for arg in ("-p", f"trainio.{package}")]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(repo_root / "pyproject.toml"),
         "--strict", "--namespace-packages", "--explicit-package-bases",
         "--cache-dir", str(tmp_path / ".mypy_cache"), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
