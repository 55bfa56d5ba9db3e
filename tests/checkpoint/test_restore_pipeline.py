"""A restore starts reading the first arrays' files before it has worked out the reads of the others, and still
refuses a target it cannot fill before it writes a byte."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trainio.checkpoint import CheckpointManager
from trainio.checkpoint._format.checks import FileEntry
from trainio.checkpoint._restore import step_reader
from trainio.checkpoint._tiers.local import LocalTierIO
from trainio.storage import CheckpointError

from ._ranks import free_port

torch = pytest.importorskip("torch")

NAMES = [f"layer{i}" for i in range(8)]


def state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {name: torch.randn(64, 256, generator=g) for name in NAMES}  # 64 KiB each


def test_the_first_files_are_read_while_the_rest_is_worked_out(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step_reader, "FIRST_READS", 100_000)  # the first two arrays planned at once
    first_read = threading.Event()
    read_into, plan_later = LocalTierIO.read_into, step_reader.StepReader._plan_later

    def reading(self: LocalTierIO, step: int, key: str, entry: FileEntry, target: memoryview) -> None:
        read_into(self, step, key, entry, target)
        first_read.set()

    later: list[str] = []

    def planning(self: step_reader.StepReader, load: Any, *handing: Any) -> Any:
        assert first_read.wait(10), "every read was worked out before the first file was read"
        later.extend(path for path, _ in load.later)
        return plan_later(self, load, *handing)

    monkeypatch.setattr(LocalTierIO, "read_into", reading)
    monkeypatch.setattr(step_reader.StepReader, "_plan_later", planning)
    expected = state()
    with CheckpointManager([tmp_path], chunk_bytes=1 << 20, pack_bytes=0) as manager:
        manager.save(1, expected).wait()
        target = {name: torch.zeros_like(value) for name, value in expected.items()}
        manager.restore(into=target)
    assert later == NAMES[2:]
    assert all(torch.equal(target[name], expected[name]) for name in NAMES)


@pytest.fixture
def one_rank() -> Iterator[Any]:
    """A world of one gloo rank and its CPU mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_a_dtensor_left_for_later_of_another_shape_is_refused_before_any_byte_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_rank: Any) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    monkeypatch.setattr(step_reader, "FIRST_READS", 1)  # every array after the first left for later
    reads: list[str] = []
    read_into = LocalTierIO.read_into
    monkeypatch.setattr(LocalTierIO, "read_into", lambda self, step, key, entry, target: (
        reads.append(key), read_into(self, step, key, entry, target))[1])
    expected = state()
    with CheckpointManager([tmp_path], chunk_bytes=1 << 20, pack_bytes=0) as manager:
        manager.save(1, {name: distribute_tensor(v, one_rank, [Shard(0)]) for name, v in expected.items()}).wait()
        target = {name: distribute_tensor(torch.zeros_like(v), one_rank, [Shard(0)]) for name, v in expected.items()}
        target[NAMES[-1]] = distribute_tensor(torch.zeros(64, 128), one_rank, [Shard(0)])
        with pytest.raises(CheckpointError, match=f"{NAMES[-1]}.*float32\\[64, 256\\].*float32\\[64, 128\\]"):
            manager.restore(into=target)
    assert not reads and not any(target[name].to_local().any() for name in NAMES)


@pytest.mark.timeout(60)
def test_an_error_working_out_the_later_reads_fails_the_restore(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step_reader, "FIRST_READS", 1)
    plan = step_reader.StepReader._plan

    def failing(self: step_reader.StepReader, load: Any, path: str, spec: Any, target: Any) -> None:
        if path == NAMES[-1]:
            raise RuntimeError(f"cannot work out {path}")
        plan(self, load, path, spec, target)

    monkeypatch.setattr(step_reader.StepReader, "_plan", failing)
    with CheckpointManager([tmp_path], chunk_bytes=1 << 20, pack_bytes=0) as manager:
        manager.save(1, state()).wait()
        with pytest.raises(RuntimeError, match=f"cannot work out {NAMES[-1]}"):
            manager.restore()
