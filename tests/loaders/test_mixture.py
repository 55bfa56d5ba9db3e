"""Mixing datasets: exact per-epoch shares, even interleaving, coverage across epochs, layouts and resumption."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trainio.loaders import DatasetWriter, Loader, ResumeMismatch, StreamingDataset
from trainio.loaders._order.mixture import MIX_BLOCK, MixedOrder, apportion


def _write(path: Path, first: int, rows: int) -> Path:
    with DatasetWriter(path, shard_bytes=4_000, batch_rows=16) as writer:
        writer.write_batch({"id": np.arange(first, first + rows), "x": np.ones((rows, 4), np.float32)})
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return _write(tmp_path / "a", 0, 300), _write(tmp_path / "b", 10_000, 100)


def test_apportion_is_exact_and_proportional() -> None:
    assert apportion([3, 1], 400) == (300, 100)
    assert apportion([1, 1, 1], 100) == (34, 33, 33)
    assert sum(apportion([0.2, 0.5, 0.3], 12_345)) == 12_345
    with pytest.raises(ValueError, match="weights"):
        apportion([0, 0], 10)


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_dataset_gets_exactly_its_share_spread_through_the_epoch(shuffle: bool) -> None:
    order = MixedOrder(((1000,) * 200, (500,) * 10), (150_000, 50_000), seed=1, shuffle=shuffle, window=4096)
    shards, _ = order.samples(np.arange(order.size))
    source = (shards >= 200).astype(np.int64)
    assert np.bincount(source).tolist() == [150_000, 50_000]
    for begin in range(0, order.size - MIX_BLOCK, MIX_BLOCK):
        share = source[begin:begin + MIX_BLOCK].mean()
        assert abs(share - 0.25) < 0.01, "every block holds each dataset's share"


def test_a_downsampled_dataset_shows_all_of_itself_over_epochs_and_an_upsampled_one_repeats_evenly() -> None:
    rows = ((25,) * 4, (10,) * 2)  # 100 and 20 samples
    seen: list[Counter[tuple[int, int]]] = [Counter(), Counter()]
    for epoch in range(4):
        order = MixedOrder(rows, (25, 50), seed=3, epoch=epoch)
        shards, local = order.samples(np.arange(order.size))
        for shard, row in zip(shards.tolist(), local.tolist()):
            seen[0 if shard < 4 else 1][(shard, row)] += 1
    assert len(seen[0]) == 100 and set(seen[0].values()) == {1}, "4 epochs x 25 samples cover the 100 once"
    assert len(seen[1]) == 20 and set(seen[1].values()) == {10}, "4 epochs x 50 samples show each of 20 ten times"


def test_mixed_order_is_deterministic_and_depends_on_seed_and_epoch() -> None:
    rows = ((100,) * 3, (50,) * 2)
    first = MixedOrder(rows, (200, 100), seed=5).samples(np.arange(300))
    again = MixedOrder(rows, (200, 100), seed=5).samples(np.arange(300))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    other = MixedOrder(rows, (200, 100), seed=5, epoch=1).samples(np.arange(300))
    assert not np.array_equal(first[0], other[0]) or not np.array_equal(first[1], other[1])


def test_streaming_a_mixture_by_weight(pair: tuple[Path, Path]) -> None:
    a, b = pair
    dataset = StreamingDataset([(a, 0.5), (b, 0.5)], epoch_size=200, seed=2)
    ids = [int(s["id"]) for s in dataset]
    from_b = [i for i in ids if i >= 10_000]
    assert len(ids) == 200 == len(dataset) and len(from_b) == 100 and len(set(from_b)) == 100
    assert len(set(ids)) == 200


def test_without_weights_a_mixture_is_a_concatenation(pair: tuple[Path, Path]) -> None:
    ids = sorted(int(s["id"]) for s in StreamingDataset(list(pair), seed=0))
    assert ids == list(range(300)) + list(range(10_000, 10_100))


def test_every_layout_sees_the_same_steps(pair: tuple[Path, Path]) -> None:
    def steps(ranks: int) -> list[list[int]]:
        per_rank = []
        for rank in range(ranks):
            dataset = StreamingDataset([(pair[0], 2), (pair[1], 1)], seed=7, batch_size=10, rank=rank,
                                       world_size=ranks, partitions=1)
            per_rank.append([int(s["id"]) for s in dataset])
        batches = [[r[i:i + 10] for i in range(0, len(r), 10)] for r in per_rank]
        return [sorted(sum((b[step] for b in batches if step < len(b)), [])) for step in range(len(batches[0]))]

    one = steps(1)
    assert len(one) == 40 and _merge(one, 2) == steps(2)


def _merge(single: list[list[int]], ranks: int) -> list[list[int]]:
    """One rank's steps regrouped into steps of ``ranks`` ranks (the global batch grows with the ranks)."""
    return [sorted(sum(single[i:i + ranks], [])) for i in range(0, len(single), ranks)]


def test_resuming_a_mixture_and_refusing_other_weights(pair: tuple[Path, Path]) -> None:
    sources = [(pair[0], 3.0), (pair[1], 1.0)]
    dataset = StreamingDataset(sources, seed=4, batch_size=10)
    first = []
    for i, sample in enumerate(dataset):
        first.append(int(sample["id"]))
        if i == 99:
            break
    state = dataset.state_dict()
    resumed = StreamingDataset(sources, seed=4, batch_size=10)
    resumed.load_state_dict(state)
    full = [int(s["id"]) for s in StreamingDataset(sources, seed=4, batch_size=10)]
    assert first + [int(s["id"]) for s in resumed] == full
    with pytest.raises(ResumeMismatch, match="weight saved 1.0, now 2.0"):
        StreamingDataset([(pair[0], 3.0), (pair[1], 2.0)], seed=4).load_state_dict(state)


def test_the_loader_reads_a_mixture(pair: tuple[Path, Path]) -> None:
    dataset = StreamingDataset([(pair[0], 1), (pair[1], 1)], epoch_size=120, seed=9, batch_size=16)
    reference = [int(s["id"]) for s in StreamingDataset([(pair[0], 1), (pair[1], 1)], epoch_size=120, seed=9,
                                                        batch_size=16)]
    got = [i for batch in Loader(dataset, 16) for i in batch["id"].tolist()]
    assert got == reference and len(got) == 120


def test_a_mixture_of_different_schemas_is_refused(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    with DatasetWriter(tmp_path / "c") as writer:
        writer.write({"id": 1})
    with pytest.raises(ValueError, match="must share one schema"):
        StreamingDataset([pair[0], tmp_path / "c"])
