"""Every README block marked ``<!-- runnable -->`` runs as written, in order, in an empty directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ._seaweedfs import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` is the quick lane; .ci/run runs everything

pytest.importorskip("torch")

_BLOCK = re.compile(r"<!-- runnable -->\n```(python|bash)\n(.*?)```", re.DOTALL)
_BUCKET = "trainio-demo"


def runnable_blocks(readme: Path) -> list[tuple[str, str, int]]:
    """(language, code, line) of each runnable block, in order."""
    text = readme.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 3) for m in _BLOCK.finditer(text)]


def test_the_readme_has_runnable_blocks(repo_root: Path) -> None:
    blocks = runnable_blocks(repo_root / "README.md")
    assert len(blocks) >= 6 and {lang for lang, _, _ in blocks} == {"python", "bash"}
    assert any("s3://" in code for _, code, _ in blocks)


def test_every_runnable_readme_block_runs(repo_root: Path, tmp_path: Path, seaweedfs: SeaweedFS,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert _BUCKET not in [b["Name"] for b in seaweedfs.client().list_buckets()["Buckets"]]  # the README makes it
    for name, value in {"AWS_ENDPOINT_URL": seaweedfs.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                        "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for language, code, line in runnable_blocks(repo_root / "README.md"):
        if language == "python":
            exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
            continue
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"README.md:{line}: {code}\n{result.stdout}\n{result.stderr}"
