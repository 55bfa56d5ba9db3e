"""Loader(transform=, workers=): per-sample transforms in worker processes, batches handed over in shared memory."""

from __future__ import annotations

import glob
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainio.loaders import DatasetWriter, Loader, LoaderError, StreamingDataset

pytestmark = pytest.mark.timeout(120)  # a dead or failing worker must never hang the loader

ROWS = 300


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("transform") / "ds"
    with DatasetWriter(path, shard_bytes=20_000, batch_rows=25) as writer:
        writer.write_batch({"id": np.arange(ROWS), "x": np.arange(ROWS * 4, dtype=np.float32).reshape(ROWS, 4)})
    return path


def noisy(sample: dict[str, Any]) -> dict[str, Any]:
    """A random transform: noise from numpy's and torch's global generators, and a string field."""
    noise = np.random.random(4).astype(np.float32) + torch.rand(4).numpy()
    return {"id": sample["id"], "x": sample["x"] * 2 + noise, "name": f"sample {int(sample['id'])}"}


def run(local: Path, workers: int, steps: int | None = None, state: dict[str, Any] | None = None,
        **options: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    dataset = StreamingDataset(local, seed=3, batch_size=16)
    if state is not None:
        dataset.load_state_dict(state)
    loader = Loader(dataset, 16, transform=noisy, workers=workers, **options)
    batches = []
    try:
        for batch in loader:
            batches.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
            if steps is not None and len(batches) == steps:
                return batches, dataset.state_dict()
        return batches, dataset.state_dict()
    finally:
        loader.close()


def test_batches_keep_the_epochs_order_and_the_augmentation_is_the_same_whatever_the_workers(local: Path) -> None:
    one, _ = run(local, 1)
    three, _ = run(local, 3)
    plain = [[int(i) for i in b["id"]] for b in Loader(StreamingDataset(local, seed=3, batch_size=16), 16)]
    assert [b["id"].tolist() for b in three] == plain and sorted(sum(plain, [])) == list(range(ROWS))
    for a, b in zip(one, three):
        assert torch.equal(a["x"], b["x"]) and a["name"] == b["name"]
    assert three[0]["x"].dtype == torch.float32 and three[0]["x"].shape == (16, 4)
    assert three[0]["name"][0] == f"sample {int(three[0]['id'][0])}"


def test_a_resumed_epoch_gives_the_same_augmented_samples(local: Path) -> None:
    whole, _ = run(local, 2)
    first, state = run(local, 2, steps=5)
    rest, _ = run(local, 3, state=state)
    assert len(first) + len(rest) == len(whole)
    for a, b in zip(first + rest, whole):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["x"], b["x"])


def test_batches_held_by_the_trainer_are_never_overwritten(local: Path) -> None:
    loader = Loader(StreamingDataset(local, seed=3, batch_size=16), 16, transform=noisy, workers=2,
                    slot_bytes=200)  # every batch outgrows its slot: the workers make larger ones
    held = list(loader)
    again, _ = run(local, 2)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(held, again))
    loader.close()
    del held
    assert not glob.glob(f"/dev/shm/trainio-slot-{os.getpid()}-*")


def fails_at_123(sample: dict[str, Any]) -> dict[str, Any]:
    if int(sample["id"]) == 123:
        raise KeyError("no label for this one")
    return sample


def dies_at_123(sample: dict[str, Any]) -> dict[str, Any]:
    if int(sample["id"]) == 123:
        os.kill(os.getpid(), signal.SIGKILL)
    return sample


def different_shapes(sample: dict[str, Any]) -> dict[str, Any]:
    return {"crop": np.zeros(int(sample["id"]) % 3 + 1)}


@pytest.mark.parametrize(("transform", "message"), [
    (fails_at_123, r"transform worker \d failed at .*shard-\d+\.arrow.*: KeyError: 'no label for this one'"),
    (dies_at_123, r"transform worker \d \(pid \d+\) died \(killed by signal SIGKILL\)"),
    (different_shapes, r"field 'crop' is float64\[\d\] in one sample and float64\[\d\] in another"),
])
def test_a_failing_worker_is_named_and_nothing_hangs(local: Path, transform: Any, message: str) -> None:
    loader = Loader(StreamingDataset(local, seed=3, batch_size=16, shuffle=False), 16, transform=transform,
                    workers=2)
    delivered: list[int] = []
    with pytest.raises(LoaderError, match=message):
        for batch in loader:
            delivered.extend(int(i) for i in batch["id"])
    assert 123 not in delivered
    loader.close()


def test_leaving_early_then_reading_the_whole_epoch(local: Path) -> None:
    dataset = StreamingDataset(local, seed=3, batch_size=16)
    loader = Loader(dataset, 16, workers=2)  # no transform: the samples as they are
    for i, _ in enumerate(loader):
        if i == 2:
            break
    assert dataset.epoch == 0
    ids = [int(i) for batch in loader for i in batch["id"]]
    assert sorted(ids) == list(range(ROWS)) and dataset.epoch == 1
    loader.close()


def test_settings_that_cannot_work_are_refused(local: Path) -> None:
    dataset = StreamingDataset(local, batch_size=16)
    with pytest.raises(ValueError, match="runs in worker processes"):
        Loader(dataset, 16, transform=noisy)
    with pytest.raises(ValueError, match="collate and workers"):
        Loader(dataset, 16, workers=2, collate=list)


def stuck_at_123(sample: dict[str, Any]) -> dict[str, Any]:
    if int(sample["id"]) == 123:
        import time

        time.sleep(3600)
    return sample


def test_a_stuck_worker_is_reported_after_the_timeout(local: Path) -> None:
    loader = Loader(StreamingDataset(local, seed=3, batch_size=16, shuffle=False), 16, transform=stuck_at_123,
                    workers=2, timeout_s=2)
    with pytest.raises(LoaderError, match=r"no batch from the transform workers for 2 s"):
        for _ in loader:
            pass
    loader.close()


def test_a_full_dev_shm_is_a_clear_error_not_a_bus_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from trainio.loaders._batch import shared_slots

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shared_slots.os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"cannot make a shared-memory slot of 1000 bytes .*--shm-size"):
        shared_slots.SharedSlot(1000)
    assert not glob.glob(f"/dev/shm/trainio-slot-{os.getpid()}-*")


def test_byte_strings_come_packed_as_the_in_process_loader_packs_them(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "blobs", shard_bytes=4_000, batch_rows=10) as writer:
        for i in range(100):
            writer.write({"id": i, "blob": bytes([i % 251]) * (i % 17)})
    ours = list(Loader(StreamingDataset(tmp_path / "blobs", seed=1, batch_size=8), 8, workers=2))
    threads = list(Loader(StreamingDataset(tmp_path / "blobs", seed=1, batch_size=8), 8))
    assert len(ours) == len(threads)
    for a, b in zip(ours, threads):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["blob_offsets"], b["blob_offsets"].long())
        assert torch.equal(a["blob"], b["blob"])
