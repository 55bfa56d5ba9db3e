"""Loader: batches assembled in-process, exactly once, safe buffer reuse, errors and early exits handled."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from trainio.loaders import DatasetWriter, Loader, LoaderError, StreamingDataset

ROWS = 1001


@pytest.fixture
def ragged(tmp_path: Path) -> Path:
    with DatasetWriter(tmp_path / "ds", shard_bytes=30_000, batch_rows=50) as writer:
        for i in range(ROWS):
            writer.write({"id": i, "tokens": np.arange(i % 7 + 1, dtype=np.int32) + i,
                          "image": np.full((2, 3), i % 200, np.uint8), "name": f"s{i}"})
    return tmp_path / "ds"


@pytest.fixture
def uniform(tmp_path: Path) -> Path:
    with DatasetWriter(tmp_path / "u", shard_bytes=100_000, batch_rows=64) as writer:
        writer.write_batch({"id": np.arange(ROWS), "tokens": np.arange(ROWS * 16, dtype=np.int32).reshape(ROWS, 16)})
    return tmp_path / "u"


@pytest.fixture(params=["native copy", "torch copy"])
def copier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The loader copying with trainio's C routine, or (as where it could not be built) without it."""
    import trainio.loaders._batch.gather as gather

    if request.param == "torch copy":
        monkeypatch.setattr(gather, "_native", None)
    elif gather._native is None:
        pytest.skip("trainio.loaders._batch._copy was not built (no C compiler at install)")
    return str(request.param)


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_hold_every_sample_once_with_its_values(ragged: Path, shuffle: bool, copier: str) -> None:
    seen = []
    for batch in Loader(StreamingDataset(ragged, shuffle=shuffle, seed=3, batch_size=32), 32):
        ids = batch["id"].tolist()
        assert isinstance(batch["id"], torch.Tensor) and batch["tokens"].dtype == torch.int32
        for j, i in enumerate(ids):
            length = int(batch["tokens_lengths"][j])
            assert length == i % 7 + 1
            assert batch["tokens"][j, :length].tolist() == list(range(i, i + length))
            assert batch["tokens"][j, length:].tolist() == [0] * (batch["tokens"].shape[1] - length)
            assert batch["image"][j].tolist() == [[i % 200] * 3] * 2
            assert batch["name"][j] == f"s{i}"
        seen.extend(ids)
    assert sorted(seen) == list(range(ROWS))
    if shuffle:
        assert seen != sorted(seen)


def test_the_loader_order_is_the_datasets(uniform: Path) -> None:
    reference = [int(s["id"]) for s in StreamingDataset(uniform, seed=8, batch_size=10)]
    got = [i for b in Loader(StreamingDataset(uniform, seed=8, batch_size=10), 10) for i in b["id"].tolist()]
    assert got == reference


def test_packed_lists_and_fixed_padding(ragged: Path) -> None:
    batch = next(iter(Loader(StreamingDataset(ragged, shuffle=False), 5, lists="pack")))
    offsets = batch["tokens_offsets"].tolist()
    assert offsets == [0, 1, 3, 6, 10, 15]
    assert batch["tokens"][offsets[3]:offsets[4]].tolist() == [3, 4, 5, 6]
    padded = next(iter(Loader(StreamingDataset(ragged, shuffle=False), 8, pad_to=4, pad_value=-1)))
    assert padded["tokens"].shape == (8, 4)
    assert padded["tokens"][1].tolist() == [1, 2, -1, -1]
    assert padded["tokens"][6].tolist() == [6, 7, 8, 9], "longer rows are cut at pad_to"
    assert padded["tokens_lengths"][6] == 4


@pytest.mark.parametrize("pad_to", [6, 200])
def test_rows_padded_past_their_buffers_end_keep_their_values(ragged: Path, pad_to: int) -> None:
    # Padded rows are gathered whole-width, reading past each row's end: a row near the end of its
    # record batch's buffer (or every row, when pad_to exceeds the buffers) must still come out exact.
    seen = []
    for batch in Loader(StreamingDataset(ragged, seed=5), 9, pad_to=pad_to, pad_value=-3):
        assert batch["tokens"].shape[1] == pad_to
        for j, i in enumerate(batch["id"].tolist()):
            length = min(i % 7 + 1, pad_to)
            assert int(batch["tokens_lengths"][j]) == length
            assert batch["tokens"][j].tolist() == list(range(i, i + length)) + [-3] * (pad_to - length)
            seen.append(i)
    assert sorted(seen) == list(range(ROWS))


def test_uniform_lists_come_as_one_block(uniform: Path) -> None:
    batch = next(iter(Loader(StreamingDataset(uniform, shuffle=False), 4)))
    assert batch["tokens"].shape == (4, 16) and batch["tokens"][3, 0] == 48


def test_held_batches_stay_intact_while_newer_ones_arrive(uniform: Path) -> None:
    held = []
    for batch in Loader(StreamingDataset(uniform, shuffle=False), 16, prefetch=2):
        held.append((batch, batch["tokens"].clone()))
    for batch, copy in held:
        assert torch.equal(batch["tokens"], copy), "a staging slot was reused while its batch was still held"


def test_drop_last_and_metrics(ragged: Path) -> None:
    loader = Loader(StreamingDataset(ragged, shuffle=False), 100, drop_last=True)
    sizes = [len(b["id"]) for b in loader]
    assert sizes == [100] * 10 == [100] * len(loader)
    assert len(Loader(StreamingDataset(ragged), 100)) == 11
    metrics = loader.metrics()
    assert metrics["samples"] == 1000 and metrics["batches"] == 10
    assert metrics["bytes"] > 0 and metrics["samples_per_s"] > 0 and metrics["wait_s"] >= 0


def test_collate_gets_sample_dicts(ragged: Path) -> None:
    loader = Loader(StreamingDataset(ragged, shuffle=False), 3, collate=lambda samples: [int(s["id"]) for s in samples])
    assert next(iter(loader)) == [0, 1, 2]


def test_background_errors_surface_with_their_cause(ragged: Path) -> None:
    def broken(samples: list[dict[str, object]]) -> None:
        raise KeyError("no such field")

    with pytest.raises(LoaderError, match="background work failed") as info:
        list(Loader(StreamingDataset(ragged), 4, collate=broken))
    assert isinstance(info.value.__cause__, KeyError)


def test_leaving_early_stops_the_thread(ragged: Path) -> None:
    for i, _ in enumerate(Loader(StreamingDataset(ragged), 4, prefetch=2)):
        if i == 3:
            break
    assert not [t for t in threading.enumerate() if t.name.startswith("trainio-loader")]


def test_resume_state_counts_what_the_loader_handed_out(uniform: Path) -> None:
    dataset = StreamingDataset(uniform, seed=5, batch_size=10)
    seen = []
    for i, batch in enumerate(Loader(dataset, 10)):
        seen.extend(batch["id"].tolist())
        if i == 9:
            break
    state = dataset.state_dict()
    assert state["consumed"] == 100
    resumed = StreamingDataset(uniform, seed=5, batch_size=10)
    resumed.load_state_dict(state)
    rest = [i for b in Loader(resumed, 10) for i in b["id"].tolist()]
    assert sorted(seen + rest) == list(range(ROWS))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_cuda_batches_arrive_on_the_device_intact(uniform: Path) -> None:
    reference = [b["tokens"].clone() for b in Loader(StreamingDataset(uniform, shuffle=False), 32)]
    got = list(Loader(StreamingDataset(uniform, shuffle=False), 32, device="cuda"))
    assert all(b["tokens"].is_cuda for b in got)
    for batch, expected in zip(got, reference):
        assert torch.equal(batch["tokens"].cpu(), expected)


def test_cuda_device_without_cuda_is_refused(uniform: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        Loader(StreamingDataset(uniform), 4, device="cuda")


def _blobs() -> list[bytes]:
    """300 random blobs of 3 to 15 KB: on average long enough to be packed by one concatenation."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=int(rng.integers(3000, 15000)), dtype=np.uint8).tobytes() for _ in range(300)]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    blobs = _blobs()
    table = pa.table({"id": np.arange(300), "image": pa.array(blobs, pa.binary())})
    with DatasetWriter(tmp_path / "img", shard_bytes=200_000, batch_rows=40) as writer:
        writer.write_table(table)
    return tmp_path / "img"


@pytest.mark.parametrize("lists", ["pad", "pack"])
def test_binary_fields_come_as_uint8_rows(images: Path, lists: str, copier: str) -> None:
    blobs = _blobs()
    seen = 0
    for batch in Loader(StreamingDataset(images, seed=2, batch_size=16), 16, lists=lists):  # type: ignore[arg-type]
        assert batch["image"].dtype == torch.uint8
        for j, i in enumerate(batch["id"].tolist()):
            if lists == "pack":
                offsets = batch["image_offsets"]
                row = batch["image"][int(offsets[j]):int(offsets[j + 1])]
            else:
                row = batch["image"][j, :int(batch["image_lengths"][j])]
                assert not batch["image"][j, int(batch["image_lengths"][j]):].any(), "padding is pad_value"
            assert row.numpy().tobytes() == blobs[i]
            seen += 1
    assert seen == 300


@pytest.mark.parametrize("threads", [1, 3])
def test_any_number_of_threads_gives_the_same_batches(ragged: Path, threads: int) -> None:
    def ids(loader: Loader) -> list[list[int]]:
        return [b["id"].tolist() for b in loader]

    reference = ids(Loader(StreamingDataset(ragged, seed=4, batch_size=7), 7))
    assert ids(Loader(StreamingDataset(ragged, seed=4, batch_size=7), 7, threads=threads, prefetch=1)) == reference
    assert sum(len(b) for b in reference) == ROWS


def test_numpy_batches_without_torch(uniform: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainio.loaders._batch.gather as gather
    import trainio.loaders._loader as loader_module

    monkeypatch.setattr(gather, "torch", None)
    monkeypatch.setattr(gather, "_native", None)
    monkeypatch.setattr(loader_module, "resolve_device", lambda device: (None, "cpu"))
    expected = np.arange(ROWS * 16, dtype=np.int32).reshape(ROWS, 16)
    batches = list(Loader(StreamingDataset(uniform, seed=1, batch_size=50), 50))
    assert all(isinstance(b["tokens"], np.ndarray) for b in batches)
    for batch in batches:
        assert np.array_equal(batch["tokens"], expected[batch["id"]])


@pytest.mark.parametrize("pad_value", [7, 255])
def test_long_rows_are_padded_with_the_pad_value(images: Path, pad_value: int) -> None:
    batch = next(iter(Loader(StreamingDataset(images, shuffle=False), 10, lists="pad", pad_value=pad_value)))
    lengths = batch["image_lengths"].tolist()
    assert max(lengths) > min(lengths)
    for row, length in zip(batch["image"], lengths):
        assert (row[length:] == pad_value).all()


@pytest.mark.parametrize("lists", ["pad", "pack"])
def test_collate_in_a_dataloader_builds_the_loaders_batches(ragged: Path, lists: str) -> None:
    from torch.utils.data import DataLoader

    def batches(source: object) -> list[dict[str, object]]:
        return [b for b in source]  # type: ignore[attr-defined]

    ours = batches(Loader(StreamingDataset(ragged, seed=1, batch_size=8), 8, lists=lists))  # type: ignore[arg-type]
    dataset = StreamingDataset(ragged, seed=1, batch_size=8)
    theirs = batches(DataLoader(dataset, batch_size=8, collate_fn=dataset.collate(lists=lists)))  # type: ignore[arg-type]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), key  # type: ignore[arg-type]
            else:
                assert a[key] == b[key], key


def test_by_default_binary_is_packed_and_lists_of_numbers_padded(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    def blob(i: int) -> bytes:
        return bytes([i % 251]) * (i % 13 + 1)

    with DatasetWriter(tmp_path / "mixed", shard_bytes=20_000, batch_rows=30) as writer:
        for i in range(200):
            writer.write({"id": i, "tokens": np.arange(i % 5 + 1, dtype=np.int32) + i, "blob": blob(i)})
    dataset = StreamingDataset(tmp_path / "mixed", seed=3, batch_size=16)
    ours = list(Loader(dataset, 16))
    dataset.set_epoch(0)  # the same epoch again (a finished one advances by itself)
    theirs = list(DataLoader(dataset, batch_size=16, collate_fn=dataset.collate()))
    assert len(ours) == len(theirs) == 13
    for batch, collated in zip(ours, theirs):
        assert set(batch) == set(collated) == {"id", "tokens", "tokens_lengths", "blob", "blob_offsets"}
        for key in batch:
            assert torch.equal(batch[key], collated[key]), key
        offsets = batch["blob_offsets"].tolist()
        for j, i in enumerate(batch["id"].tolist()):
            assert batch["blob"][offsets[j]:offsets[j + 1]].numpy().tobytes() == blob(i)
            assert batch["tokens"][j, :i % 5 + 1].tolist() == list(range(i, i + i % 5 + 1))


def test_an_unknown_list_layout_is_refused_naming_the_choices(ragged: Path) -> None:
    from trainio.loaders import Collate

    with pytest.raises(ValueError, match="lists='padded': must be one of 'auto', 'pad', 'pack'"):
        Loader(StreamingDataset(ragged), 8, lists="padded")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lists='padded'"):
        Collate(lists="padded")  # type: ignore[arg-type]


def test_collate_turns_bytes_into_uint8_rows(images: Path) -> None:
    from torch.utils.data import DataLoader

    from trainio.loaders import Collate

    loader = DataLoader(StreamingDataset(images, shuffle=False, batch_size=16), batch_size=16, num_workers=2,
                        collate_fn=Collate(lists="pack"))
    first = next(iter(loader))
    dataset = StreamingDataset(images, shuffle=False)
    offsets = first["image_offsets"].tolist()
    for j, sample in zip(range(16), dataset):
        assert first["image"][offsets[j]:offsets[j + 1]].numpy().tobytes() == sample["image"]
    # one shared-memory segment per batch: the worker hands the trainer one file descriptor, not one per array
    storage = first["image"].untyped_storage()
    assert storage.is_shared() and first["image_offsets"].untyped_storage().data_ptr() == storage.data_ptr()


def test_collate_in_workers_keeps_batches_of_strings_only(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    with DatasetWriter(tmp_path / "names", shard_bytes=10_000) as writer:
        writer.write_table(pa.table({"name": [f"n{i}" for i in range(100)]}))
    dataset = StreamingDataset(tmp_path / "names", shuffle=False, batch_size=10)
    names = [name for batch in DataLoader(dataset, batch_size=10, num_workers=2, collate_fn=dataset.collate())
             for name in batch["name"]]
    assert sorted(names) == sorted(f"n{i}" for i in range(100))


def test_a_thread_that_cannot_start_fails_the_epoch_and_leaves_no_thread(ragged: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import concurrent.futures.thread

    started = 0
    real_start = threading.Thread.start

    def start_once(thread: threading.Thread) -> None:
        nonlocal started
        if thread.name.startswith("trainio-loader_") and started == 1:
            raise RuntimeError("can't start new thread")
        started += thread.name.startswith("trainio-loader_")
        real_start(thread)

    monkeypatch.setattr(concurrent.futures.thread.threading.Thread, "start", start_once)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        next(iter(Loader(StreamingDataset(ragged), 8, threads=2)))
    monkeypatch.undo()
    assert not [t for t in threading.enumerate() if t.name.startswith("trainio-loader")]
