"""StreamingDataset cut into partitions: nodes read their own shards, resume across layouts, refuse what cannot fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch.utils.data import DataLoader

from trainio.loaders import Dataset, DatasetWriter, Loader, PartitionError, ResumeMismatch, StreamingDataset
from trainio.storage import S3Store, ShardCache

ROWS = 3001


def write(target: str | Path | S3Store, rows: int = ROWS, shard_bytes: int = 6_000) -> None:
    with DatasetWriter(target, shard_bytes=shard_bytes, batch_rows=32, overwrite=True) as writer:
        writer.write_batch({"id": np.arange(rows), "tokens": np.arange(rows * 8, dtype=np.int32).reshape(rows, 8)})


@pytest.fixture
def local(tmp_path: Path) -> Path:
    write(tmp_path / "ds")
    return tmp_path / "ds"


def shard_of(path: Path) -> np.ndarray:
    """The shard of every id of the dataset (ids are row numbers in dataset order)."""
    rows = [info.rows for info in Dataset(path).shards]
    return np.repeat(np.arange(len(rows)), rows)


def job(source: Any, nodes: int, per_node: int, batch: int, **options: Any) -> list[StreamingDataset]:
    return [StreamingDataset(source, batch_size=batch, rank=rank, world_size=nodes * per_node, ranks_per_node=per_node,
                             **options) for rank in range(nodes * per_node)]


def run(ranks: list[StreamingDataset], batch: int, steps: int | None = None) -> list[list[int]]:
    """Each step's ids, ranks in order, the ranks advancing together as a training job does."""
    iterators = [iter(r) for r in ranks]
    result = []
    while steps is None or len(result) < steps:
        step = [int(s["id"]) for it in iterators for _, s in zip(range(batch), it)]
        if not step:
            return result
        result.append(step)
    return result


def test_nodes_read_their_own_shards_and_together_every_sample_once(local: Path) -> None:
    ranks = job(local, nodes=2, per_node=2, batch=8, seed=5, shuffle_window=256)
    assert ranks[0].partitions == 2 and ranks[3].node_partitions() == range(1, 2)
    per_rank = [[int(s["id"]) for s in r] for r in ranks]
    assert sorted(i for r in per_rank for i in r) == list(range(ROWS))
    shard = shard_of(local)
    nodes = [set(shard[per_rank[0] + per_rank[1]].tolist()), set(shard[per_rank[2] + per_rank[3]].tolist())]
    assert len(nodes[0] & nodes[1]) <= 1, "only the shard straddling the two partitions is read by both nodes"
    total = len(set(shard.tolist()))
    assert len(nodes[0]) <= total // 2 + 2 and len(nodes[1]) <= total // 2 + 2


def test_ranks_per_node_comes_from_local_world_size(local: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert StreamingDataset(local, batch_size=2, rank=5, world_size=8).node_partitions() == range(2, 3)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert StreamingDataset(local, batch_size=2, rank=5, world_size=8).node_partitions() == range(5, 6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(PartitionError, match="8 ranks are not a whole number of nodes of 3 ranks"):
        StreamingDataset(local, batch_size=2, rank=5, world_size=8)


def test_resume_mid_epoch_on_another_node_count_reads_the_same_steps(local: Path) -> None:
    whole = run(job(local, nodes=4, per_node=1, batch=6, seed=9), 6)
    first = job(local, nodes=4, per_node=1, batch=6, seed=9)
    done = run(first, 6, steps=40)
    state = json.loads(json.dumps(first[0].state_dict(consumed=40 * 24)))
    assert state["partitions"] == 4 and state["global_batch"] == 24
    again = job(local, nodes=2, per_node=3, batch=4, seed=9)  # 2 nodes of 3 ranks: the same 24 samples a step
    for rank in again:
        rank.load_state_dict(state)
        assert rank.partitions == 4
    rest = run(again, 4)
    assert [sorted(s) for s in done + rest] == [sorted(s) for s in whole], "every step holds the same samples"
    again[0].set_epoch(1)
    assert again[0].partitions == 2, "the next epoch is cut for the nodes the job has now"


def test_resume_on_a_node_count_that_does_not_divide_the_partitions_is_refused(local: Path) -> None:
    state = job(local, nodes=4, per_node=1, batch=6)[0].state_dict(consumed=240)
    with pytest.raises(ResumeMismatch, match=r"4 partitions and the job runs on 3 nodes.*run on 1, 2, 4 nodes"):
        job(local, nodes=3, per_node=1, batch=8)[0].load_state_dict(state)
    with pytest.raises(ResumeMismatch, match="global batch of 24 samples, and this job's is 16"):
        job(local, nodes=2, per_node=1, batch=8)[0].load_state_dict(state)
    with pytest.raises(ResumeMismatch, match="consumed is 250, not a whole number of global batches of 24"):
        job(local, nodes=4, per_node=1, batch=6)[0].load_state_dict(dict(state, consumed=250))
    with pytest.raises(ResumeMismatch, match="partitions is 0"):
        job(local, nodes=4, per_node=1, batch=6)[0].load_state_dict(dict(state, partitions=0))


def test_a_state_without_partitions_resumes_the_unpartitioned_order(local: Path) -> None:
    old = {k: v for k, v in StreamingDataset(local, batch_size=4, seed=2).state_dict(consumed=400).items()
           if k not in ("partitions", "global_batch")}
    ranks = job(local, nodes=2, per_node=1, batch=4, seed=2)
    for rank in ranks:
        rank.load_state_dict(old)
    assert ranks[0].partitions == 1
    expected = StreamingDataset(local, batch_size=8, seed=2)
    expected.load_state_dict(old)
    assert [i for step in run(ranks, 4) for i in step] == [int(s["id"]) for s in expected]


def test_partitions_that_do_not_fit_the_job_are_refused_at_start(local: Path) -> None:
    with pytest.raises(PartitionError, match="3 partitions and the job runs on 2 nodes.*run on 1, 3 nodes"):
        job(local, nodes=2, per_node=1, batch=6, partitions=3)
    with pytest.raises(PartitionError, match="partitions=4 does not divide the global batch of 6"):
        job(local, nodes=2, per_node=1, batch=3, partitions=4)
    with pytest.raises(ValueError, match="partitions=0"):
        StreamingDataset(local, partitions=0)
    assert len(job(local, nodes=3, per_node=1, batch=2, partitions=1)) == 3, "one partition fits any node count"


def test_the_loader_and_dataloader_workers_read_the_partitioned_order(local: Path) -> None:
    reference = [[int(s["id"]) for s in r] for r in job(local, nodes=2, per_node=2, batch=8, seed=3)]
    for rank, dataset in enumerate(job(local, nodes=2, per_node=2, batch=8, seed=3)):
        assert [i for b in Loader(dataset, 8) for i in b["id"].tolist()] == reference[rank]
    dataset = job(local, nodes=2, per_node=2, batch=8, seed=3)[2]
    got = [int(i) for b in DataLoader(dataset, batch_size=8, num_workers=2) for i in b["id"]]
    assert got == reference[2]


def test_the_cache_need_counts_only_the_nodes_partitions(s3_store: S3Store, s3_url: str, tmp_path: Path) -> None:
    write(s3_store)
    one = StreamingDataset(s3_url, batch_size=8, cache_dir=tmp_path / "c", shuffle_window=512, partitions=1,
                           rank=0, world_size=4)
    four = job(s3_url, nodes=4, per_node=1, batch=8, cache_dir=tmp_path / "c", shuffle_window=512)
    assert four[0].cache_need() < one.cache_need(), "a node keeps windows of 512 / 4 samples of each of its partitions"


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2, 4, 8])
def test_each_node_downloads_about_its_share_through_a_cache_near_its_minimum(
        s3_store: S3Store, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nodes: int) -> None:
    rows = 8192
    write(s3_store, rows=rows, shard_bytes=2_000)
    shard_bytes = {info.path: info.bytes for info in Dataset(s3_url).shards}
    downloads: list[tuple[str, str]] = []  # (cache directory, key) of every download the caches make
    download = ShardCache._download

    def counted(cache: ShardCache, key: str, expected: str | None, path: str, size: int | None) -> None:
        downloads.append((str(cache._root), key))
        download(cache, key, expected, path, size)

    monkeypatch.setattr(ShardCache, "_download", counted)
    seen: list[int] = []
    def rank(node: int, local: int, limit: int) -> StreamingDataset:
        return StreamingDataset(s3_url, batch_size=8, rank=node * 2 + local, world_size=nodes * 2, ranks_per_node=2,
                                cache_dir=tmp_path / f"node{node}", cache_limit=limit, shuffle_window=512,
                                prefetch_shards=1, seed=11)

    for node in range(nodes):
        need = rank(node, 0, 1 << 40).cache_need()  # the cache at its minimum: holding everything would prove nothing
        assert need < sum(shard_bytes.values()) / nodes / 2
        iterators = [iter(rank(node, local, need)) for local in range(2)]
        while step := [int(s["id"]) for it in iterators for _, s in zip(range(8), it)]:  # the ranks in step
            seen.extend(step)
        mine = [key for root, key in downloads if root == str(tmp_path / f"node{node}")]
        assert len(mine) == len(set(mine)), "no shard is downloaded twice"
        downloaded = sum(shard_bytes[key] for key in mine)
        bound = 1.1 * sum(shard_bytes.values()) / nodes + max(shard_bytes.values())
        assert 0 < downloaded <= bound, f"node {node} of {nodes} downloaded {downloaded} bytes, bound {bound:.0f}"
    assert sorted(seen) == list(range(rows))


def test_a_loader_reading_ahead_past_the_cache_says_so(s3_store: S3Store, s3_url: str, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    write(s3_store)
    dataset = StreamingDataset(s3_url, batch_size=8, cache_dir=tmp_path / "c", shuffle_window=256, seed=1)
    loader = Loader(dataset, 8)
    assert loader.cache_need() > dataset.cache_need(), "reading ahead widens what the cache must keep"
    small = StreamingDataset(s3_url, batch_size=8, cache_dir=tmp_path / "c", shuffle_window=256, seed=1,
                             cache_limit=dataset.cache_need())
    with caplog.at_level("WARNING", logger="trainio.loaders.streaming"):
        loader = Loader(small, 8)
    assert f"is below the {loader.cache_need()} bytes that reading" in caplog.text
    assert sorted(i for b in loader for i in b["id"].tolist()) == list(range(ROWS)), "it still reads everything"


def test_a_mixture_on_two_nodes_keeps_its_shares_and_each_node_its_part_of_each_dataset(tmp_path: Path) -> None:
    write(tmp_path / "a", rows=2000)
    with DatasetWriter(tmp_path / "b", shard_bytes=6_000, batch_rows=32) as writer:
        writer.write_batch({"id": np.arange(10_000, 10_600), "tokens": np.zeros((600, 8), np.int32)})
    sources = [(tmp_path / "a", 3.0), (tmp_path / "b", 1.0)]
    ranks = job(sources, nodes=2, per_node=1, batch=8, seed=2, epoch_size=2400)
    assert ranks[0].partitions == 2
    per_node = [[int(s["id"]) for s in r] for r in ranks]
    every = per_node[0] + per_node[1]
    assert sum(i < 10_000 for i in every) == 1800 and sum(i >= 10_000 for i in every) == 600
    assert len(set(every)) == len(every), "both datasets' shares are within one pass: no sample twice"
    shards_a, shards_b = shard_of(tmp_path / "a"), shard_of(tmp_path / "b")
    for dataset_shards, pick in ((shards_a, lambda i: i < 10_000), (shards_b, lambda i: i >= 10_000)):
        nodes = [{int(dataset_shards[i % 10_000]) for i in ids if pick(i)} for ids in per_node]
        assert len(nodes[0] & nodes[1]) <= 1, "each node reads its own part of each dataset"
