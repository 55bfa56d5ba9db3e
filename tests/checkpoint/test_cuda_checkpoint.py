"""Checkpoints of CUDA tensors: bit-exact back into CUDA tensors by every read path, every file checked on the way,
and a save that blocks only for its device-to-host copy. Runs only where CUDA is."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from trainio.checkpoint import CheckpointManager, Tier
from trainio.checkpoint._restore.device_reads import kvikio_path
from trainio.checkpoint._tiers.local import LocalStepWriter
from trainio.storage import CheckpointError

from ._ranks import free_port
from .test_manager import _flip_byte

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: CUDA tensors are staged through pinned memory")

CHUNK = 1 << 20  # many chunk files per tensor, the last of each padded
KVIKIO = pytest.mark.skipif(kvikio_path() is None, reason="kvikio is not installed: pip install 'trainio[gds]'")


def _state(seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return {"model": {"w": torch.randn(1000, 3001, device="cuda", generator=gen),
                      "e": torch.randn(4097, 257, device="cuda", generator=gen).bfloat16(),
                      "b": torch.randn(7, device="cuda", generator=gen).bfloat16(),  # these two in the pack
                      "scale": torch.tensor(3.5, device="cuda") + seed},
            "optim": {"step": torch.tensor(7.0, device="cuda") + seed},  # a group of packed tensors only
            "step": seed}


def _zeros(state: dict[str, Any]) -> dict[str, Any]:
    return {**{group: {k: torch.zeros_like(v) for k, v in state[group].items()} for group in ("model", "optim")},
            "step": 0}


def _assert_restored(target: dict[str, Any], expected: dict[str, Any]) -> None:
    for group in ("model", "optim"):
        for name, value in target[group].items():
            assert value.is_cuda, name
            assert torch.equal(value.cpu(), expected[group][name].cpu()), name


@pytest.mark.parametrize("mode", ["auto", "off", pytest.param("always", marks=KVIKIO)])
def test_cuda_tensors_restore_bit_exact_into_cuda_tensors(tmp_path: Path, mode: str) -> None:
    state = _state(1)
    with CheckpointManager([tmp_path], chunk_bytes=CHUNK, gpu_direct=mode) as manager:
        manager.save(1, state).wait()
        for _ in range(2):  # the second restore reuses the pinned buffers
            target = _zeros(state)
            restored, report = manager.restore_with_report(into=target)
            assert restored["model"]["w"] is target["model"]["w"]
            _assert_restored(target, state)
    found = kvikio_path()
    expected = {"off": "pinned-host", "auto": "gds" if found == "gds" else "pinned-host", "always": found}[mode]
    assert report.to_device == expected
    assert report.to_device_bytes >= state["model"]["w"].nbytes + state["model"]["e"].nbytes
    assert not report.fell_back  # kvikio leaves a padded edge chunk to the pinned path, as no fault


@pytest.mark.parametrize("mode", ["off", pytest.param("always", marks=KVIKIO)])
def test_a_flipped_bit_on_the_fast_tier_is_read_from_the_next(tmp_path: Path, mode: str) -> None:
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    state = _state(2)
    with CheckpointManager([Tier(fast), Tier(slow)], chunk_bytes=CHUNK, gpu_direct=mode) as manager:
        manager.save(2, state).wait()
        manager.wait()
        _flip_byte(fast / f"{2:012d}" / "state.zarr" / "model" / "w" / "c.1.0", 4096)
        target = _zeros(state)
        _, report = manager.restore_with_report(into=target)
    _assert_restored(target, state)
    assert any("model/w/c.1.0" in key for key in report.fell_back), report.fell_back


@pytest.mark.parametrize("mode", ["off", pytest.param("always", marks=KVIKIO)])
def test_a_flipped_bit_on_the_only_tier_is_an_error(tmp_path: Path, mode: str) -> None:
    state = _state(3)
    with CheckpointManager([tmp_path], chunk_bytes=CHUNK, gpu_direct=mode) as manager:
        manager.save(3, state).wait()
        _flip_byte(tmp_path / f"{3:012d}" / "state.zarr" / "model" / "e" / "c.0.0", 77)
        with pytest.raises(CheckpointError, match=r"model/e/c\.0\.0.*damaged or missing on every tier"):
            manager.restore(into=_zeros(state))


def test_a_save_blocks_only_for_its_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """save() returns while no file is written yet; what it saved is the state as it was when called."""
    release = threading.Event()
    write = LocalStepWriter.write

    def held(self: LocalStepWriter, key: str, data: memoryview, size: int) -> None:
        release.wait(60)
        write(self, key, data, size)

    monkeypatch.setattr(LocalStepWriter, "write", held)
    state = _state(4)
    expected = {group: {k: v.clone() for k, v in state[group].items()} for group in ("model", "optim")}
    with CheckpointManager([tmp_path], chunk_bytes=CHUNK) as manager:
        handle = manager.save(4, state)
        assert not handle.done() and not any(manager.steps().values())
        for value in [*state["model"].values(), *state["optim"].values()]:
            value.add_(1)  # the caller's tensors are its own again once save returns
        release.set()
        handle.wait()
        target = _zeros(state)
        manager.restore(into=target)
    _assert_restored(target, expected)


def test_a_dtensor_on_one_rank_restores_into_a_cuda_dtensor(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        full = _state(5)["model"]
        state = {name: distribute_tensor(full[name], mesh, [Shard(0)]) for name in ("w", "e")}
        with CheckpointManager([tmp_path], chunk_bytes=CHUNK) as manager:
            manager.save(5, state).wait()
            target = {name: distribute_tensor(torch.zeros_like(full[name]), mesh, [Shard(0)]) for name in state}
            manager.restore(into=target)
        for name, value in target.items():
            assert value.to_local().is_cuda
            assert torch.equal(value.full_tensor().cpu(), full[name].cpu()), name
    finally:
        dist.destroy_process_group()
