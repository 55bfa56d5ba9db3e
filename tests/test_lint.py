"""The code passes ruff with the project's configuration (import order and the rules pyproject.toml selects)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_ruff_is_clean(repo_root: Path) -> None:
    pytest.importorskip("ruff")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
