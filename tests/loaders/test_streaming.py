"""StreamingDataset: exactly once, the same order under any layout, exact resume, remote caching."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from trainio.loaders import DatasetWriter, Loader, ResumeMismatch, StreamingDataset
from trainio.storage import IntegrityError, S3Store, ShardCache, StoreError

ROWS = 2003  # not a multiple of any batch or layout


def write_dataset(target: str | Path | S3Store, rows: int = ROWS, shard_bytes: int = 20_000) -> None:
    with DatasetWriter(target, shard_bytes=shard_bytes, batch_rows=64, overwrite=True) as writer:
        writer.write_batch({"id": np.arange(rows), "tokens": np.arange(rows * 8, dtype=np.int32).reshape(rows, 8)})


@pytest.fixture
def local(tmp_path: Path) -> Path:
    write_dataset(tmp_path / "ds")
    return tmp_path / "ds"


def ids(dataset: object) -> list[int]:
    return [int(sample["id"]) for sample in dataset]  # type: ignore[attr-defined]


def test_samples_carry_their_values(local: Path) -> None:
    sample = next(iter(StreamingDataset(local, shuffle=False)))
    assert int(sample["id"]) == 0 and sample["tokens"].dtype == np.int32
    np.testing.assert_array_equal(sample["tokens"], np.arange(8))


def test_one_epoch_is_a_permutation_fixed_by_seed_and_epoch(local: Path) -> None:
    first = ids(StreamingDataset(local, seed=5))
    assert sorted(first) == list(range(ROWS)) and first != sorted(first)
    assert ids(StreamingDataset(local, seed=5)) == first
    assert ids(StreamingDataset(local, seed=6)) != first
    next_epoch = StreamingDataset(local, seed=5)
    next_epoch.set_epoch(1)
    assert ids(next_epoch) != first


@pytest.mark.parametrize(("ranks", "batch"), [(1, 12), (2, 6), (4, 3), (3, 4)])
def test_ranks_together_read_each_sample_once_in_the_same_global_order(local: Path, ranks: int, batch: int) -> None:
    per_rank = [ids(StreamingDataset(local, batch_size=batch, seed=1, rank=r, world_size=ranks, partitions=1))
                for r in range(ranks)]
    assert sorted(i for r in per_rank for i in r) == list(range(ROWS))
    global_order = []
    for step in range(max(len(r) for r in per_rank) // batch + 1):
        for r in per_rank:
            global_order.extend(r[step * batch:(step + 1) * batch])
    assert global_order == ids(StreamingDataset(local, batch_size=12, seed=1))
    assert [len(StreamingDataset(local, batch_size=batch, rank=r, world_size=ranks, partitions=1))
            for r in range(ranks)] == \
        [len(r) for r in per_rank]


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_dataloader_workers_keep_the_order(local: Path) -> None:
    reference = ids(StreamingDataset(local, batch_size=16, seed=2))
    for workers in (2, 3):
        loader = DataLoader(StreamingDataset(local, batch_size=16, seed=2), batch_size=16, num_workers=workers)
        got = [int(i) for batch in loader for i in batch["id"]]
        assert got == reference


def test_resume_mid_epoch_with_another_layout(local: Path) -> None:
    whole = ids(StreamingDataset(local, batch_size=8, seed=9))
    first_job = StreamingDataset(local, batch_size=8, seed=9)
    seen = []
    for sample in first_job:
        seen.append(int(sample["id"]))
        if len(seen) == 800:
            break
    state = json.loads(json.dumps(first_job.state_dict()))
    assert state["consumed"] == 800
    rest = []
    for rank in range(2):  # the job comes back with two ranks, global batch unchanged
        resumed = StreamingDataset(local, batch_size=4, seed=9, rank=rank, world_size=2)
        resumed.load_state_dict(state)
        rest.append(ids(resumed))
    assert sorted(seen + rest[0] + rest[1]) == list(range(ROWS))
    assert seen == whole[:800]


def test_resume_state_from_a_dataloader_job(local: Path) -> None:
    dataset = StreamingDataset(local, batch_size=10, seed=4)
    loader = DataLoader(dataset, batch_size=10, num_workers=2)
    consumed = []
    for step, batch in enumerate(loader):
        consumed.extend(int(i) for i in batch["id"])
        if step == 19:
            break
    state = dataset.state_dict(consumed=len(consumed))
    resumed = StreamingDataset(local, batch_size=10, seed=4)
    resumed.load_state_dict(state)
    assert sorted(consumed + ids(resumed)) == list(range(ROWS))


def test_resume_against_a_changed_dataset_or_seed_is_refused(local: Path) -> None:
    state = StreamingDataset(local, seed=1).state_dict(consumed=100)
    with pytest.raises(ResumeMismatch, match="seed: saved 1, now 2"):
        StreamingDataset(local, seed=2).load_state_dict(state)
    write_dataset(local, rows=ROWS + 1)
    with pytest.raises(ResumeMismatch, match=r"dataset 0 .* index.json changed"):
        StreamingDataset(local, seed=1).load_state_dict(state)


def test_uneven_policies(local: Path) -> None:
    for uneven, expected in (("drop", ROWS - ROWS % 24), ("pad", ROWS + (-ROWS) % 24)):
        per_rank = [ids(StreamingDataset(local, batch_size=8, rank=r, world_size=3, uneven=uneven))  # type: ignore[arg-type]
                    for r in range(3)]
        assert len({len(r) for r in per_rank}) == 1
        assert sum(len(r) for r in per_rank) == expected


def test_early_break_leaks_no_threads_or_pins(s3_store: S3Store, s3_url: str, tmp_path: Path) -> None:
    write_dataset(s3_store)
    dataset = StreamingDataset(s3_url, cache_dir=tmp_path / "cache", prefetch_shards=3)
    for i, _ in enumerate(dataset):
        if i == 50:
            break
    assert not [t for t in threading.enumerate() if t.name.startswith("trainio-prefetch")]
    cache = ShardCache(s3_store, tmp_path / "cache", 1 << 30)
    cached = cache.used_bytes()
    assert cached > 0
    cache.clear()
    assert cache.used_bytes() == 0, "a shard stayed pinned after the loop ended"


def test_shards_larger_than_the_plan_are_prefetched_in_the_epochs_order(
    s3_store: S3Store, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In order, a chunk's plan holds only the shard being read when shards hold more than two chunks of samples;
    the shards after it still download ahead, in the prefetch threads."""
    write_dataset(s3_store, rows=60_000, shard_bytes=800_000)
    by: dict[str, str] = {}  # key -> the thread that downloaded it
    download = ShardCache._download

    def recorded(cache: ShardCache, key: str, expected: str | None, path: str, size: int | None) -> None:
        by[key] = threading.current_thread().name
        download(cache, key, expected, path, size)

    monkeypatch.setattr(ShardCache, "_download", recorded)
    dataset = StreamingDataset(s3_url, cache_dir=tmp_path / "cache", shuffle=False, prefetch_shards=2)
    assert ids(dataset) == list(range(60_000))
    first, *rest = sorted(by)
    assert len(rest) >= 2 and not by[first].startswith("trainio-prefetch")
    assert all(by[key].startswith("trainio-prefetch") for key in rest), by


def test_remote_dataset_through_a_cache_smaller_than_the_dataset(
    s3_store: S3Store, s3_url: str, tmp_path: Path
) -> None:
    write_dataset(s3_store, shard_bytes=8_000)
    sizes = [s3_store.size(k) for k in s3_store.list("shards")]
    limit = sum(sizes) * 6 // 10
    dataset = StreamingDataset(s3_url, cache_dir=tmp_path / "cache", cache_limit=limit, shuffle_window=128,
                               prefetch_shards=1, seed=3)
    assert sorted(ids(dataset)) == list(range(ROWS))
    cached = sum(f.stat().st_size for f in (tmp_path / "cache" / "objects").rglob("*") if f.is_file())
    assert cached <= limit


def test_the_loader_reads_a_remote_dataset_through_a_small_cache_mixed_with_a_local_one(
    s3_store: S3Store, s3_url: str, local: Path, tmp_path: Path
) -> None:
    write_dataset(s3_store, shard_bytes=8_000)
    sizes = [s3_store.size(k) for k in s3_store.list("shards")]
    limit = sum(sizes) * 6 // 10
    sources = [(local, 1.0), (s3_url, 1.0)]
    dataset = StreamingDataset(sources, cache_dir=tmp_path / "cache", cache_limit=limit, shuffle_window=128,
                               prefetch_shards=1, seed=3, batch_size=32)
    loader = Loader(dataset, 32)
    got = [i for batch in loader for i in batch["id"].tolist()]
    assert sorted(got) == sorted(list(range(ROWS)) * 2)
    assert loader.metrics()["cache_misses"] > 0
    cached = sum(f.stat().st_size for f in (tmp_path / "cache" / "objects").rglob("*") if f.is_file())
    assert cached <= limit


def test_too_small_a_cache_fails_fast_with_the_figure(s3_store: S3Store, s3_url: str, tmp_path: Path) -> None:
    write_dataset(s3_store, shard_bytes=8_000)
    with pytest.raises(StoreError, match=r"cache_limit=1000 bytes is below the \d+ bytes this node's order needs"):
        StreamingDataset(s3_url, cache_dir=tmp_path / "cache", cache_limit=1000)


def test_a_corrupt_remote_shard_is_named(s3_store: S3Store, s3_url: str, tmp_path: Path) -> None:
    write_dataset(s3_store)
    victim = [key for key in s3_store.list("shards") if key.endswith(".arrow")][1]
    data = bytearray(s3_store.get(victim))
    data[len(data) // 2] ^= 0xFF
    s3_store.put(victim, bytes(data))
    with pytest.raises(IntegrityError) as info:
        ids(StreamingDataset(s3_url, cache_dir=tmp_path / "cache", shuffle=False))
    assert info.value.key == victim


_RANK = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from trainio.loaders import StreamingDataset
    dist.init_process_group("gloo")
    dataset = StreamingDataset(sys.argv[1], batch_size=8, seed=11)
    loader = DataLoader(dataset, batch_size=8, num_workers=2)
    ids = [int(i) for batch in loader for i in batch["id"]]
    with open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(ids, f)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_gloo_ranks_with_dataloader_workers_read_each_sample_once(local: Path, tmp_path: Path) -> None:
    from .._seaweedfs import free_ports

    port = free_ports(1)[0]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",  # one node, as torchrun
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, str(local), str(tmp_path)], env=env))
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(ROWS))
    reference = ids(StreamingDataset(local, batch_size=16, seed=11))
    steps = [per_rank[r][t * 8:(t + 1) * 8] for t in range(len(per_rank[0]) // 8 + 1) for r in range(2)]
    assert [i for s in steps for i in s] == reference
    assert torch.distributed.is_available()


@pytest.mark.parametrize("workers", [0, 2])
def test_torchdata_stateful_dataloader_resumes_exactly(local: Path, workers: int) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader(dataset: StreamingDataset) -> StatefulDataLoader:
        return StatefulDataLoader(dataset, batch_size=16, num_workers=workers)

    full = [int(i) for batch in loader(StreamingDataset(local, seed=6, batch_size=16)) for i in batch["id"]]
    first_job = loader(StreamingDataset(local, seed=6, batch_size=16))
    seen = []
    for step, batch in enumerate(first_job):
        seen.extend(int(i) for i in batch["id"])
        if step == 20:
            break
    state = first_job.state_dict()
    del first_job
    second_job = loader(StreamingDataset(local, seed=6, batch_size=16))
    second_job.load_state_dict(state)
    rest = [int(i) for batch in second_job for i in batch["id"]]
    assert seen + rest == full


def test_a_worker_state_cannot_resume_another_worker_count(local: Path) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    job = StatefulDataLoader(StreamingDataset(local, seed=6, batch_size=16), batch_size=16, num_workers=2)
    for step, _ in enumerate(job):
        if step == 3:
            break
    state = job.state_dict()
    worker_state = next(iter(state["_snapshot"]["_worker_snapshots"].values()))["dataset_state"]
    assert worker_state["worker"]["workers"] == 2
    with pytest.raises(ResumeMismatch, match="cannot resume worker 0 of 1"):
        StreamingDataset(local, seed=6, batch_size=16).load_state_dict(worker_state)


@pytest.mark.slow
def test_a_spawned_dataloader_gets_the_dataset_as_it_was_opened(local: Path) -> None:
    import pickle

    dataset = StreamingDataset(local, seed=2, batch_size=16)
    copy = pickle.loads(pickle.dumps(dataset))
    assert ids(copy) == ids(dataset)
    loader = DataLoader(dataset, batch_size=16, num_workers=2, multiprocessing_context="spawn")
    assert sorted(int(i) for batch in loader for i in batch["id"]) == list(range(ROWS))
