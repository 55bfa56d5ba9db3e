"""A local tier's step is durable before its manifest is: every file it wrote is flushed first, whichever way."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager, Tier
from trainio.storage import _sync_files as fsync_module

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")


def _record_flushes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync (of a path) and syncfs (of a file system, by a directory on it) from now on, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_syncfs = os.fsync, fsync_module._syncfs()

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def syncfs(fd: int) -> int:
        events.append(("syncfs", os.readlink(f"/proc/self/fd/{fd}")))
        return real_syncfs(fd) if real_syncfs is not None else 0

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(fsync_module, "_syncfs", lambda: syncfs)
    return events


def _state() -> dict[str, Any]:
    return {"big": np.arange(3 << 18, dtype=np.float32), "other": np.ones((512, 1024), np.float32),
            "small": [np.full(10, i, np.int64) for i in range(4)], "step": 7}


@pytest.mark.parametrize("many", [False, True], ids=["fsync-each", "syncfs"])
def test_every_file_of_a_step_is_flushed_before_its_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             many: bool) -> None:
    monkeypatch.setattr(fsync_module, "FSYNC_EACH_MAX", 0 if many else 10_000)
    events = _record_flushes(monkeypatch)
    with CheckpointManager([Tier(tmp_path / "tier")], chunk_bytes=1 << 20, pack_bytes=0) as manager:
        manager.save(1, _state()).wait()
    step = tmp_path / "tier" / "000000000001"
    files = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()}
    assert sum(1 for f in files if f.startswith("state.zarr/") and "/c." in f) >= 4
    manifest = next(i for i, (kind, path) in enumerate(events) if kind == "fsync" and path.endswith("/manifest.json"))
    before = events[:manifest]
    if many:
        assert any(kind == "syncfs" for kind, _ in before)
    else:
        flushed = {path.split("/", 4)[-1] for kind, path in before if kind == "fsync"}
        chunks = {f for f in files if f != "manifest.json"}
        assert {f for f in chunks if not any(p.endswith("/" + f) for p in flushed)} == set(), (
            "a file of the step was not fsynced before the manifest")
    synced = [path for kind, path in before
              if kind == "fsync" and "/state.zarr/" in path and ("/c." in path or path.endswith("zarr.json"))]
    assert len(synced) == len(set(synced)), "a file is flushed once, with the others, not also when written"
    if many:
        assert not any("/c." in path for path in synced), "with one syncfs, no chunk file needs an fsync of its own"
