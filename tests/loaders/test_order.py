"""The epoch order and its dealing to (rank, worker): pure properties, no I/O."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainio.loaders._order.epoch_order import EpochOrder, Layout


def consumption(size: int, ranks: int, workers: int, batch: int, start: int = 0, uneven: str = "exact") -> list[list[int]]:
    """Per training step, the positions each rank's DataLoader hands out, ranks in order, flattened."""
    per_rank = []
    for rank in range(ranks):
        streams = [Layout(ranks, rank, workers, w, batch).positions(size, start, uneven).tolist()  # type: ignore[arg-type]
                   for w in range(workers)]
        batches_by_worker = [[s[i:i + batch] for i in range(0, len(s), batch)] for s in streams]
        ordered = []
        k = 0
        while any(batches_by_worker):
            queue = batches_by_worker[k % workers]
            if queue:
                ordered.append(queue.pop(0))
            k += 1
        per_rank.append(ordered)
    steps = []
    for t in range(max(len(r) for r in per_rank)):
        steps.append([p for r in per_rank if t < len(r) for p in r[t]])
    return steps


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 300), ranks=st.integers(1, 4), workers=st.integers(1, 3), batch=st.integers(1, 9),
       start=st.integers(0, 50))
def test_every_position_is_read_exactly_once(size: int, ranks: int, workers: int, batch: int, start: int) -> None:
    seen = [p for step in consumption(size, ranks, workers, batch, start) for p in step]
    assert sorted(seen) == list(range(min(start, size), size))


@pytest.mark.parametrize("uneven", ["drop", "pad"])
def test_drop_and_pad_give_every_rank_the_same_count(uneven: str) -> None:
    counts = {Layout(3, r, 2, 0, 4).count(50, 0, uneven) for r in range(3)}  # type: ignore[arg-type]
    assert len(counts) == 1
    assert counts.pop() == (48 if uneven == "drop" else 60) // 3


def test_the_global_sequence_is_the_same_for_every_layout_of_one_global_batch() -> None:
    reference = consumption(101, 1, 1, 8)
    for ranks, workers in ((2, 2), (4, 1), (1, 3), (8, 2)):
        steps = consumption(101, ranks, workers, 8 // ranks)
        assert [sorted(s) for s in steps] == [sorted(s) for s in reference]
        assert [p for s in steps for p in s] == [p for s in reference for p in s]


def test_epoch_order_is_a_deterministic_permutation_that_mixes_shards() -> None:
    order = EpochOrder((100, 50, 200, 30), seed=7, epoch=3, window=64)
    shards, rows = order.samples(np.arange(order.size))
    pairs = set(zip(shards.tolist(), rows.tolist()))
    assert len(pairs) == order.size == 380
    assert all(0 <= r < (100, 50, 200, 30)[s] for s, r in pairs)
    again = EpochOrder((100, 50, 200, 30), seed=7, epoch=3, window=64).samples(np.arange(380))
    assert np.array_equal(shards, again[0]) and np.array_equal(rows, again[1])
    other_epoch = EpochOrder((100, 50, 200, 30), seed=7, epoch=4, window=64).samples(np.arange(380))
    assert not np.array_equal(shards, other_epoch[0])
    first_window_shards = set(shards[:64].tolist())
    assert len(first_window_shards) >= 1 and not np.array_equal(rows[:64], np.sort(rows[:64]))


def test_small_dataset_is_shuffled_as_a_whole() -> None:
    order = EpochOrder((10, 10, 10), seed=1)
    shards, _ = order.samples(np.arange(30))
    assert len(set(shards[:10].tolist())) > 1, "samples of several shards mix within the first ten"


def test_without_shuffle_the_order_is_the_datasets() -> None:
    shards, rows = EpochOrder((3, 2), shuffle=False).samples(np.arange(5))
    assert shards.tolist() == [0, 0, 0, 1, 1] and rows.tolist() == [0, 1, 2, 0, 1]
