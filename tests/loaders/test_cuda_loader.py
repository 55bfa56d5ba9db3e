"""The Loader on a CUDA device: the same bytes as on the CPU, batches the trainer holds never overwritten, and
nothing left behind by an early break. Runs only where CUDA is."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainio.loaders import DatasetWriter, Loader, StreamingDataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: batches are staged in pinned memory and copied on a side stream")

ROWS = 2000
BATCH = 32


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ragged int32 token rows, a float label and an id, in many small shards."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("cuda") / "tokens"
    with DatasetWriter(path, shard_bytes=200_000, batch_rows=100) as writer:
        for i in range(ROWS):
            writer.write({"id": i, "tokens": rng.integers(0, 50_000, size=int(rng.integers(1, 300)), dtype=np.int32),
                          "label": np.float32(i) / 7})
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Encoded-image-like byte strings of 3 to 40 KB and fixed-shape uint8 thumbnails."""
    rng = np.random.default_rng(2)
    path = tmp_path_factory.mktemp("cuda") / "images"
    with DatasetWriter(path, shard_bytes=1_000_000, batch_rows=50) as writer:
        for i in range(600):
            writer.write({"id": i, "thumb": rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8),
                          "image": rng.integers(0, 256, size=int(rng.integers(3000, 40_000)), dtype=np.uint8).tobytes()})
    return path


def _loader(path: Path, device: str, lists: str = "pad", **options: Any) -> Loader:
    return Loader(StreamingDataset(path, seed=11, batch_size=BATCH), BATCH, device=device, lists=lists,  # type: ignore[arg-type]
                  **options)


def _cpu_batches(path: Path, lists: str) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in b.items()} for b in _loader(path, "cpu", lists)]


@pytest.mark.parametrize("lists", ["pad", "pack"])
@pytest.mark.parametrize("which", ["tokens", "images"])
def test_device_batches_equal_cpu_batches_bit_for_bit(which: str, lists: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(which)
    expected = _cpu_batches(path, lists)
    loader = _loader(path, "cuda", lists)
    got = list(loader)
    assert loader.metrics()["to_device"] == "pinned-host"
    assert len(got) == len(expected) > 10
    for batch, reference in zip(got, expected, strict=True):
        assert batch.keys() == reference.keys()
        for name, value in batch.items():
            assert value.is_cuda, name
            assert value.dtype == reference[name].dtype, name
            assert torch.equal(value.cpu(), reference[name]), name


def test_the_trainer_stream_sees_each_batch_whole_without_synchronizing(tokens: Path) -> None:
    """Work queued on the trainer's stream right away reads the finished copy (the stream waits on its event)."""
    expected = [int(b["tokens"].long().sum()) for b in _loader(tokens, "cpu")]
    sums = []
    for batch in _loader(tokens, "cuda", prefetch=2):
        sums.append(batch["tokens"].long().sum())  # queued, not waited for
    torch.cuda.synchronize()
    assert [int(s) for s in sums] == expected


def test_held_batches_are_never_overwritten_by_later_ones(tokens: Path) -> None:
    expected = _cpu_batches(tokens, "pad")
    loader = _loader(tokens, "cuda", prefetch=1, threads=2)
    for _ in range(2):  # the second pass reuses the first's staging slots
        loader.dataset.set_epoch(0)
        held = list(loader)
        scratch = [torch.empty_like(b["tokens"]).fill_(-1) for b in held]  # the caching allocator's reuse, too
        for batch, reference in zip(held, expected, strict=True):
            assert torch.equal(batch["tokens"].cpu(), reference["tokens"])
            assert torch.equal(batch["id"].cpu(), reference["id"])
        del held, scratch


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("trainio-loader")]


def _active_pinned_bytes() -> int:
    """Pinned bytes in use, once freed blocks whose copies have finished are counted as free (torch's host allocator
    counts them only at its next allocation)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.empty(1, dtype=torch.uint8, pin_memory=True)  # an allocation: the allocator settles its freed blocks
    return int(torch.cuda.host_memory_stats().get("active_bytes.current", 0))


def test_early_break_leaves_no_thread_or_pinned_slot_behind(tokens: Path) -> None:
    before = _active_pinned_bytes()
    loader = _loader(tokens, "cuda")
    first = None
    for attempt in range(4):
        for i, _batch in enumerate(loader):
            if i == 3:
                break
        del _batch
        deadline = time.monotonic() + 10
        while _loader_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _loader_threads(), "the loader's threads outlived the break"
        ring = loader._ring
        ring._reap()
        assert ring._count == len(ring._free) + len(ring._copies), "a staging slot is still lent to a dropped group"
        active = _active_pinned_bytes()
        first = first or active
        assert active <= first + first // 4, f"break {attempt}: pinned staging grew from {first} to {active} bytes"
    assert first is not None and first > before, "the loader staged nothing in pinned memory"
    slots = [weakref.ref(slot) for slot in [*ring._free, *(slot for _, slot in ring._copies)]]
    assert slots
    del loader, ring
    gc.collect()
    assert all(slot() is None for slot in slots), "a pinned staging slot outlived the loader"
