"""Resume state: nonsense refused field by field, and no state_dict() that cannot know the position."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch.utils.data import DataLoader

from trainio.loaders import DatasetWriter, Loader, PositionUnknown, ResumeMismatch, StreamingDataset

ROWS = 4003


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "ds"
    with DatasetWriter(path, shard_bytes=40_000, batch_rows=64) as writer:
        writer.write_batch({"id": np.arange(ROWS), "tokens": np.arange(ROWS * 4, dtype=np.int32).reshape(ROWS, 4)})
    return path


def ids(dataset: object) -> list[int]:
    return [int(sample["id"]) for sample in dataset]  # type: ignore[attr-defined]


def _set(path: str, value: object) -> Any:
    def edit(state: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = state
        for part in parents:
            target = target.setdefault(part, {"id": 0, "workers": 1, "yielded": 0})
        target[last] = value
    return edit


@pytest.mark.parametrize(("edit", "field"), [
    (_set("consumed", -500), "consumed"),
    (_set("consumed", 10**9), "consumed"),
    (_set("consumed", "250"), "consumed"),
    (_set("consumed", 250.0), "consumed"),
    (_set("consumed", True), "consumed"),
    (_set("epoch", -3), "epoch"),
    (_set("epoch", None), "epoch"),
    (_set("worker.yielded", -100), "yielded"),
    (_set("worker.workers", 0), "workers"),
    (_set("worker.id", 5), "id"),
    (_set("worker", [0, 1]), "worker"),
    (_set("datasets", "x"), "datasets"),
    (_set("datasets", ["x"]), "datasets"),
])
def test_nonsense_in_a_state_is_refused_naming_the_field(local: Path, edit: Any, field: str) -> None:
    ds = StreamingDataset(local, batch_size=8, seed=5)
    state = ds.state_dict(consumed=800)
    edit(state)
    with pytest.raises(ResumeMismatch, match=f"state's {field} is") as info:
        ds.load_state_dict(state)
    assert "\n" not in str(info.value)
    assert ds.state_dict()["consumed"] == 0 and ds.epoch == 0  # nothing changed
    assert len(ids(ds)) == ROWS


@pytest.mark.parametrize("state", [[1, 2], "state", None, 3])
def test_a_state_that_is_not_a_dict_is_refused(local: Path, state: Any) -> None:
    with pytest.raises(ResumeMismatch, match=f"cannot resume from a {type(state).__name__}"):
        StreamingDataset(local).load_state_dict(state)


def test_a_worker_position_beyond_its_share_is_refused(local: Path) -> None:
    ds = StreamingDataset(local, batch_size=8)
    state = ds.state_dict(consumed=100)
    state["worker"] = {"id": 0, "workers": 1, "yielded": ROWS - 50}
    with pytest.raises(ResumeMismatch, match=f"worker.yielded is {ROWS - 50}: must be at most {ROWS - 100}"):
        ds.load_state_dict(state)


@pytest.mark.parametrize("consumed", [-1, "250", 10**9, 2.5])
def test_state_dict_refuses_a_consumed_outside_the_epoch(local: Path, consumed: Any) -> None:
    with pytest.raises(ValueError, match="consumed"):
        StreamingDataset(local, batch_size=8).state_dict(consumed=consumed)


def test_a_valid_state_still_resumes_exactly(local: Path) -> None:
    whole = ids(StreamingDataset(local, batch_size=8, seed=5))
    ds = StreamingDataset(local, batch_size=8, seed=5)
    ds.load_state_dict(copy.deepcopy(StreamingDataset(local, batch_size=8, seed=5).state_dict(consumed=800)))
    assert ids(ds) == whole[800:]
    ds.load_state_dict(StreamingDataset(local, batch_size=8, seed=5).state_dict(consumed=ROWS))
    assert ids(ds) == []


# -- a position that cannot be known -------------------------------------------------------------------------------


def test_the_main_process_of_a_dataloader_with_workers_refuses_to_guess(local: Path) -> None:
    ds = StreamingDataset(local, batch_size=16, seed=1)
    assert ds.state_dict()["consumed"] == 0  # before anything iterates, the start is known
    loader = DataLoader(ds, batch_size=16, num_workers=2)
    for step, _ in enumerate(loader):
        if step == 99:
            break
    with pytest.raises(PositionUnknown) as info:
        ds.state_dict()
    message = str(info.value)
    assert "consumed=" in message and "StatefulDataLoader" in message and "Loader" in message
    assert "\n" not in message
    assert ds.state_dict(consumed=100 * 16)["consumed"] == 1600  # the explicit position is still taken


def test_a_checkpoint_of_the_main_process_copy_is_refused_not_saved_at_position_0(local: Path, tmp_path: Path) -> None:
    from trainio.checkpoint import CheckpointManager

    ds = StreamingDataset(local, batch_size=16, seed=1)
    for step, _ in enumerate(DataLoader(ds, batch_size=16, num_workers=2)):
        if step == 99:
            break
    with CheckpointManager([tmp_path / "ckpt"]) as manager:
        with pytest.raises(PositionUnknown):
            manager.save(100, {"data": ds})
        assert manager.latest() is None
        manager.save(100, {"data": ds.state_dict(consumed=100 * 16)})  # what the message says to do
        manager.wait()
        assert manager.latest() == 100


@pytest.mark.slow
def test_the_main_process_copy_of_a_spawned_dataloader_refuses_to_guess(local: Path) -> None:
    ds = StreamingDataset(local, batch_size=16, seed=1)
    loader = DataLoader(ds, batch_size=16, num_workers=1, multiprocessing_context="spawn")
    for step, _ in enumerate(loader):
        if step == 3:
            break
    with pytest.raises(PositionUnknown, match="sent to other processes"):
        ds.state_dict()


def test_a_dataset_iterated_here_knows_its_position(local: Path) -> None:
    ds = StreamingDataset(local, batch_size=16, seed=1)
    for n, _ in enumerate(DataLoader(ds, batch_size=16, num_workers=0)):
        if n == 9:
            break
    assert ds.state_dict()["consumed"] == 160
    loader = Loader(StreamingDataset(local, batch_size=16, seed=1), 16)
    for n, _ in enumerate(loader):
        if n == 9:
            break
    assert loader.dataset.state_dict()["consumed"] == 160


def test_a_stateful_dataloader_state_of_2_workers_is_refused_by_1_before_any_sample(local: Path) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    job = StatefulDataLoader(StreamingDataset(local, seed=6, batch_size=16), batch_size=16, num_workers=2)
    for step, _ in enumerate(job):
        if step == 10:
            break
    state = job.state_dict()
    resumed = StatefulDataLoader(StreamingDataset(local, seed=6, batch_size=16), batch_size=16, num_workers=1)
    resumed.load_state_dict(state)
    delivered = []
    with pytest.raises(ResumeMismatch, match="worker 0 of 2's own position; it cannot resume worker 0 of 1") as info:
        for batch in resumed:
            delivered.append(batch)
    assert delivered == []
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.endswith("(refused in DataLoader worker process 0, before it read any sample)"), message


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_a_loader_batch_that_is_a_multiple_of_the_dataset_batch_resumes_exactly(local: Path, world: int) -> None:
    seen: list[int] = []
    states = []
    for rank in range(world):
        ds = StreamingDataset(local, batch_size=16, seed=3, rank=rank, world_size=world, partitions=1)
        for step, batch in enumerate(Loader(ds, 32)):
            seen.extend(int(i) for i in batch["id"])
            if step == 4:
                break
        states.append(ds.state_dict())
    assert all(s["consumed"] == 5 * 32 * world for s in states)
    rest = StreamingDataset(local, batch_size=16, seed=3)
    rest.load_state_dict(states[0])
    assert sorted(seen + ids(rest)) == list(range(ROWS))


def test_a_loader_batch_that_is_not_a_multiple_of_the_dataset_batch_is_refused(local: Path) -> None:
    with pytest.raises(ValueError, match="multiple of the dataset's batch_size=16"):
        Loader(StreamingDataset(local, batch_size=16), 24)
    with pytest.raises(ValueError, match="multiple of the dataset's batch_size=16"):
        Loader(StreamingDataset(local, batch_size=16), 8)
