"""The limits trainio bench measures against: they do the work they claim, on the bytes they claim."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from trainio.tools._bench_limits import DurableWrite, destination, read_files


def _files(tmp_path: Path) -> list[Path]:
    files = []
    for i, size in enumerate([(9 << 20) + 1000, 1, 3 << 20]):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(os.urandom(size))
    return files


def test_a_read_into_a_destination_puts_every_file_in_a_place_of_its_own(tmp_path: Path) -> None:
    files = _files(tmp_path)
    for whole_files in (False, True):
        into = destination(files)
        assert read_files(files, 3, into=into, whole_files=whole_files) > 0
        assert bytes(into) == b"".join(f.read_bytes() for f in files)
    with pytest.raises(ValueError, match="into holds"):
        read_files(files, 1, into=into[:-1])


def test_the_durable_write_limit_writes_and_flushes_every_file_each_way(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    like = [memoryview(f.read_bytes()) for f in _files(tmp_path)]
    target = tmp_path / "limit"
    target.mkdir()
    limit = DurableWrite(target, like, threads=2, file_bytes=4 << 20)
    flushed: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(os.fstat(fd).st_size), real_fsync(fd))[-1])
    for way in DurableWrite.WAYS:
        flushed.clear()
        assert limit() > 0
        assert list(target.iterdir()) == [], "each run deletes what it wrote"
        if way != "one":  # one sync() flushes everything at once, without fsync
            assert not Counter(limit._sizes) - Counter(flushed), f"{way}: a file was not flushed"
    assert sum(limit._sizes) == sum(view.nbytes for view in like)
