"""The epoch advances by itself: after a pass read to its end, in this process, through a Loader, and in
DataLoader workers; an explicit set_epoch or a loaded state wins; a broken pass does not advance it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from trainio.loaders import DatasetWriter, Loader, StreamingDataset

ROWS = 600


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("epochs") / "ds"
    with DatasetWriter(path, shard_bytes=8_000, batch_rows=50) as writer:
        writer.write_batch({"id": np.arange(ROWS), "x": np.arange(ROWS, dtype=np.float32)})
    return path


def ids(samples: object) -> list[int]:
    return [int(sample["id"]) for sample in samples]  # type: ignore[attr-defined]


def epoch_ids(local: Path, epoch: int, **options: object) -> list[int]:
    """The samples of ``epoch`` as a dataset told to read it gives them."""
    dataset = StreamingDataset(local, seed=5, **options)  # type: ignore[arg-type]
    dataset.set_epoch(epoch)
    return ids(dataset)


def test_a_pass_read_to_its_end_makes_the_next_pass_read_the_next_epoch(local: Path) -> None:
    dataset = StreamingDataset(local, seed=5)
    passes = [ids(dataset) for _ in range(3)]
    assert passes == [epoch_ids(local, e) for e in range(3)]
    assert passes[0] != passes[1] and sorted(passes[1]) == list(range(ROWS))
    assert dataset.epoch == 3
    assert (dataset.state_dict()["epoch"], dataset.state_dict()["consumed"]) == (3, 0)


def test_a_pass_broken_off_does_not_advance_the_epoch(local: Path) -> None:
    dataset = StreamingDataset(local, seed=5)
    for i, _ in enumerate(dataset):
        if i == 10:
            break
    assert dataset.epoch == 0


def test_set_epoch_and_a_loaded_state_win_over_the_count(local: Path) -> None:
    dataset = StreamingDataset(local, seed=5)
    first = ids(dataset)
    dataset.set_epoch(0)
    assert ids(dataset) == first  # asked for again: the same epoch
    state = StreamingDataset(local, seed=5).state_dict(consumed=100)
    state["epoch"] = 7
    dataset.load_state_dict(state)
    assert ids(dataset) == epoch_ids(local, 7)[100:]
    assert dataset.epoch == 8 and ids(dataset) == epoch_ids(local, 8)
    with pytest.raises(ValueError, match="non-negative integer"):
        dataset.set_epoch(-1)


def test_a_loader_advances_the_epoch_too(local: Path) -> None:
    dataset = StreamingDataset(local, seed=5, batch_size=32)
    loader = Loader(dataset, 32)
    passes = [[int(i) for batch in loader for i in batch["id"]] for _ in range(2)]
    assert passes == [epoch_ids(local, e, batch_size=32) for e in range(2)]
    assert len(loader) == -(-ROWS // 32)  # the next epoch's batches, before it begins


@pytest.mark.parametrize("persistent", [False, True])
def test_dataloader_workers_advance_the_epoch_the_main_process_sees(local: Path, persistent: bool) -> None:
    dataset = StreamingDataset(local, seed=5, batch_size=16)
    loader = DataLoader(dataset, batch_size=16, num_workers=2, persistent_workers=persistent,
                        multiprocessing_context="fork")
    expected = []
    for epoch in range(3):
        reference = StreamingDataset(local, seed=5, batch_size=16)
        reference.set_epoch(epoch)
        expected.append(sorted(ids(reference)))
    seen = []
    for epoch in range(3):
        got = []
        for step, batch in enumerate(loader):
            got.extend(int(i) for i in batch["id"])
            if step == 3:  # the main process's position, as the trainer saves it, names the epoch being read
                assert dataset.state_dict(consumed=64)["epoch"] == epoch
        seen.append(got)
    assert [sorted(s) for s in seen] == expected and seen[0] != seen[1] != seen[2]


@pytest.mark.slow
def test_spawned_workers_that_cannot_see_the_epoch_warn(local: Path, capfd: pytest.CaptureFixture[str]) -> None:
    dataset = StreamingDataset(local, seed=5, batch_size=16)
    loader = DataLoader(dataset, batch_size=16, num_workers=1, multiprocessing_context="spawn")
    assert sum(len(batch["id"]) for batch in loader) == ROWS
    assert "cannot see the epochs other processes read" in capfd.readouterr().err
    dataset.set_epoch(1)  # chosen by the caller: nothing to warn about
    assert sum(len(batch["id"]) for batch in loader) == ROWS
    assert "cannot see" not in capfd.readouterr().err
