"""A full first tier: the save fails through its handle, nothing partial shows, training goes on."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager
from trainio.storage import TEMP_MARKER, CheckpointError


class _Disk:
    """A directory whose space can run out and come back."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fill(self) -> None:
        raise NotImplementedError

    def free(self) -> None:
        raise NotImplementedError


class _Tmpfs(_Disk):
    def fill(self) -> None:
        with open(self.path / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC

    def free(self) -> None:
        (self.path / "filler").unlink()


class _Injected(_Disk):
    """Where mounting is not allowed: every data write fails with ENOSPC while 'full'."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(path)
        from trainio.checkpoint._tiers import local as _tier_local

        self.full = False
        real = _tier_local._write

        def write(fd: int, data: Any) -> int:
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data)

        monkeypatch.setattr(_tier_local, "_write", write)

    def fill(self) -> None:
        self.full = True

    def free(self) -> None:
        self.full = False


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Disk]:
    path = tmp_path / "disk"
    path.mkdir()
    if request.param == "injected":
        yield _Injected(path, monkeypatch)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the injected variant runs")
    try:
        yield _Tmpfs(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _state(step: int) -> dict[str, Any]:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((256, 256), dtype=np.float32), "step": step}


def test_a_full_disk_fails_the_save_and_keeps_what_was_committed(disk: _Disk) -> None:
    with CheckpointManager([disk.path]) as manager:
        manager.save(1, _state(1)).wait()
        disk.fill()
        handle = manager.save(2, _state(2))
        with pytest.raises(CheckpointError, match=r"step 2 was not saved to .*disk: .*000000000002/state.zarr/"
                                                  r".*No space left on device.*tier is full"):
            handle.wait()
        assert manager.steps() == {str(disk.path): [1]}
        assert not [n for n in os.listdir(disk.path) if n.startswith(TEMP_MARKER)]
        assert np.array_equal(manager.restore()["w"], _state(1)["w"])
        disk.free()
        manager.save(3, _state(3)).wait()
        assert manager.steps() == {str(disk.path): [1, 3]}
        assert np.array_equal(manager.restore()["w"], _state(3)["w"])
