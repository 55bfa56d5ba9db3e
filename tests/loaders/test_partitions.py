"""Partitioned epochs, as pure order properties: exactly once, the same steps on every layout, node locality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xxhash
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from trainio.loaders import PartitionError
from trainio.loaders._order.epoch_order import EpochOrder, Layout
from trainio.loaders._order.mixed_tape import PartitionedMixture
from trainio.loaders._order.mixture import MixedOrder
from trainio.loaders._order.partitions import PartitionedShuffle, node_partitions

Order = EpochOrder | PartitionedMixture


def steps_of(order: Order, nodes: int, per_node: int, workers: int, batch: int, start: int = 0,
             uneven: str = "exact") -> list[dict[int, list[tuple[int, int]]]]:
    """Per training step, each rank's samples (shard, row), as its DataLoader workers hand them out."""
    ranks = nodes * per_node
    per_rank: list[list[list[tuple[int, int]]]] = []
    for rank in range(ranks):
        streams = []
        for worker in range(workers):
            positions = Layout(ranks, rank, workers, worker, batch).positions(order.size, start, uneven)  # type: ignore[arg-type]
            shards, rows = order.samples(positions)
            pairs = list(zip(shards.tolist(), rows.tolist()))
            streams.append([pairs[i:i + batch] for i in range(0, len(pairs), batch)])
        batches, k = [], 0
        while any(streams):
            if streams[k % workers]:
                batches.append(streams[k % workers].pop(0))
            k += 1
        per_rank.append(batches)
    count = max(len(b) for b in per_rank)
    return [{r: b[t] for r, b in enumerate(per_rank) if t < len(b)} for t in range(count)]


def all_samples(rows: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(s, r) for s, n in enumerate(rows) for r in range(n)]


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    """(partitions, nodes, ranks per node, workers, batch) with nodes dividing partitions dividing the global batch."""
    partitions = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    nodes = draw(st.sampled_from([n for n in range(1, partitions + 1) if partitions % n == 0]))
    per_node = draw(st.integers(1, 3))
    unit = partitions // math.gcd(partitions, nodes * per_node)
    batch = unit * draw(st.integers(1, 3))
    return partitions, nodes, per_node, draw(st.integers(1, 3)), batch


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(st.integers(1, 40), min_size=1, max_size=12).map(tuple), layout=layouts(),
       other=layouts(), seed=st.integers(0, 5), window=st.integers(1, 64), start_fraction=st.floats(0, 1))
def test_every_sample_once_the_same_steps_on_every_layout_and_only_the_nodes_partitions(
        rows: tuple[int, ...], layout: tuple[int, int, int, int, int], other: tuple[int, int, int, int, int],
        seed: int, window: int, start_fraction: float) -> None:
    partitions, nodes, per_node, workers, batch = layout
    global_batch = nodes * per_node * batch
    order = EpochOrder(rows, seed=seed, epoch=1, window=window, partitions=partitions, global_batch=global_batch)
    start = int(order.size * start_fraction) // global_batch * global_batch  # a resumed epoch restarts at a step
    steps = steps_of(order, nodes, per_node, workers, batch, start)
    seen = [pair for step in steps for samples in step.values() for pair in samples]
    before = order.samples(np.arange(start))
    assert sorted(seen + list(zip(*(a.tolist() for a in before)))) == all_samples(rows), "every sample exactly once"

    shuffle = PartitionedShuffle(order.size, seed, 1, True, window, partitions, global_batch)
    for rank in range(nodes * per_node):  # each rank reads only its node's partitions
        positions = Layout(nodes * per_node, rank, 1, 0, batch).positions(order.size, start)
        located, _ = shuffle.locate(positions)
        assert set(located.tolist()) <= set(node_partitions(partitions, nodes, rank // per_node))

    # Another layout of the same global batch (its node count dividing the partitions) reads the same steps.
    _, nodes_b, per_node_b, workers_b, _ = other
    assume(partitions % nodes_b == 0 and global_batch % (nodes_b * per_node_b) == 0)
    steps_b = steps_of(order, nodes_b, per_node_b, workers_b, global_batch // (nodes_b * per_node_b), start)
    assert [sorted(p for s in step.values() for p in s) for step in steps] == \
        [sorted(p for s in step.values() for p in s) for step in steps_b]


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.integers(1, 40), min_size=1, max_size=10).map(tuple), layout=layouts(),
       uneven=st.sampled_from(["drop", "pad"]))
def test_drop_and_pad_stay_in_the_partition(rows: tuple[int, ...], layout: tuple[int, int, int, int, int],
                                           uneven: str) -> None:
    partitions, nodes, per_node, workers, batch = layout
    global_batch = nodes * per_node * batch
    order = EpochOrder(rows, seed=2, window=16, partitions=partitions, global_batch=global_batch)
    steps = steps_of(order, nodes, per_node, workers, batch, 0, uneven)
    seen = [pair for step in steps for samples in step.values() for pair in samples]
    counts = {len(s) for step in steps for s in step.values()}
    assert counts <= {batch}, "every rank gets whole batches"
    if uneven == "drop":
        assert len(seen) == order.size // global_batch * global_batch and len(set(seen)) == len(seen)
        return
    assert set(seen) == set(all_samples(rows)) and len(seen) == -(-order.size // global_batch) * global_batch
    shuffle = PartitionedShuffle(order.size, 2, 0, True, 16, partitions, global_batch)
    padded = np.arange(order.size, len(seen))
    parts, _ = shuffle.locate(padded)
    if order.size >= global_batch:  # a dataset of at least one step pads each partition from itself
        assert np.array_equal(parts, (padded % global_batch) // (global_batch // partitions))


def _digest(order: EpochOrder | MixedOrder) -> str:
    shards, rows = order.samples(np.arange(order.size))
    return xxhash.xxh3_64_hexdigest(np.concatenate((shards, rows)).astype(np.int64).tobytes())


def test_one_partition_is_the_unpartitioned_order_of_before() -> None:
    # Digests of the order before partitions existed (commit 083e16c), for every global batch.
    for global_batch in (1, 7, 64):
        assert _digest(EpochOrder((100, 50, 200, 30), seed=7, epoch=3, window=64, global_batch=global_batch)) == \
            "8cdbf58d65de590d"
    assert _digest(EpochOrder((4096,) * 50 + (1000,), seed=1, epoch=2, window=1 << 14)) == "184f6f58e4c11ba1"
    assert _digest(EpochOrder((10,) * 5, shuffle=False)) == "e94f90956591af77"
    assert _digest(MixedOrder(((100,) * 3, (50,) * 2), (200, 100), seed=5, window=64)) == "7850f0d27db9a88f"
    assert _digest(MixedOrder(((1000,) * 20, (500,) * 4), (30000, 12000), seed=2, epoch=1, window=4096)) == \
        "efdbf441c5f43131"


def test_partitions_are_consecutive_ranges_of_the_shuffled_shards() -> None:
    rows = (100,) * 40
    order = EpochOrder(rows, seed=3, window=256, partitions=4, global_batch=32)
    full = order.samples(np.arange(order.size))[0]
    sequence = EpochOrder(rows, seed=3, window=256).shard_sequence()
    for part in range(4):
        shards = order.shard_sequence(range(part, part + 1))
        assert sorted(shards.tolist()) == sorted(sequence[part * 10:(part + 1) * 10].tolist())
    assert len(set(full[:32].tolist())) >= 4, "one step draws from every partition"
    two_nodes = [set(order.shard_sequence(node_partitions(4, 2, n)).tolist()) for n in range(2)]
    assert not two_nodes[0] & two_nodes[1] and len(two_nodes[0]) == 20


@settings(max_examples=30, deadline=None)
@given(counts=st.tuples(st.integers(0, 300), st.integers(1, 300), st.integers(0, 100)),
       partitions=st.sampled_from([2, 3, 4, 6]), steps=st.integers(1, 4), epoch=st.integers(0, 3))
def test_a_partitioned_mixture_keeps_each_datasets_exact_share(counts: tuple[int, int, int], partitions: int,
                                                              steps: int, epoch: int) -> None:
    rows = ((30,) * 5, (20,) * 4, (7,) * 3)
    order = PartitionedMixture(rows, counts, seed=4, epoch=epoch, window=32, partitions=partitions,
                               global_batch=partitions * steps)
    shards, local = order.samples(np.arange(order.size))
    source = np.searchsorted(np.asarray([0, 5, 9, 12]), shards, side="right") - 1
    assert np.bincount(source, minlength=3).tolist() == list(counts)
    sizes = (150, 80, 21)
    for d in range(3):  # a dataset's share is its stream's next samples: each repeats once per pass they span
        picked = list(zip(shards[source == d].tolist(), local[source == d].tolist()))
        passes = -(-(epoch + 1) * counts[d] // sizes[d]) - epoch * counts[d] // sizes[d]
        assert max(np.unique(picked, axis=0, return_counts=True)[1], default=0) <= max(passes, 1)
    for part in range(partitions):  # every partition holds each dataset's share of it: a range of the even tape is
        lo, hi = int(order._shuffle.starts[part]), int(order._shuffle.starts[part + 1])  # two prefixes, each within 1
        held = np.bincount(order._tape._dataset_samples(np.arange(lo, hi))[0], minlength=3)
        assert np.all(np.abs(held - np.asarray(counts) * (hi - lo) / max(order.size, 1)) < 2)


def test_a_layout_the_partitions_do_not_fit_is_refused_naming_what_fits() -> None:
    with pytest.raises(PartitionError, match="run on 1, 2, 3, 6 nodes"):
        node_partitions(6, 4, 0)
    with pytest.raises(PartitionError, match="does not divide the global batch of 10"):
        EpochOrder((10,) * 3, partitions=4, global_batch=10)
    assert node_partitions(1, 7, 5) == range(1), "one partition runs on any node count"
