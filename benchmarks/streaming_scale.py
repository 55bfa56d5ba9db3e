"""Streaming at cluster scale, simulated in one process without I/O: what each node fetches, and how batches mix.

The dataset is only its geometry: ``--shards`` shards of ``--rows`` samples of
``--sample-bytes`` bytes (default 2,000 x 4,096 x 8 KB = 67 GB, the figures of
issue 22), nodes of 8 ranks, 8 samples a rank a step, shuffle window 2**18.
For each node count it compares the global order of before (``partitions=1``)
with the partitioned one (``partitions`` = nodes, the default):

- ``fetched/node``: the bytes node 0 downloads in one epoch through a cache of
  exactly the dataset's ``cache_need()`` for that node, simulated: the node's
  samples taken a quarter of a shuffle window's steps at a time, each shard
  not cached downloaded, evicting first what the node's joint future (the
  window and the next, what ``EpochPlan`` hands the cache) does not hold,
  then what it needs furthest ahead; ``x share`` is that over the dataset's
  bytes / nodes, and the bound of the issue is 1.1 x share + one shard per
  partition of the node;
- ``cache need``: the smallest cache that node needs;
- ``shards/batch`` and ``label TV``: on a dataset whose shards are sorted by a
  label (10 labels, 200 shards each), the distinct shards in each of the first
  200 global batches, and the total-variation distance of each global batch's
  label histogram from the epoch's (0: every batch holds each label's share;
  1: a batch holds one label), averaged; ``rank shards`` is the distinct shards
  in one rank's own batch of 8.

Then the start of a resumed epoch at ``--resume-ranks`` simulated ranks: the
order work one rank does before its first batch, from half-way through the
epoch (building the order, its positions, the first chunk's samples and the
node's joint future, the shards it will check, the cache figure), and the same
through a real ``StreamingDataset`` on a small local dataset (index, state,
first sample).

Run:  python benchmarks/streaming_scale.py [--nodes 1,2,4,8,16,32,64] [--shards 2000] [--rows 4096]
          [--sample-bytes 8192] [--resume-ranks 10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, machine_lines, markdown_table  # noqa: E402

from trainio.loaders import DatasetWriter, StreamingDataset  # noqa: E402
from trainio.loaders._order.epoch_order import DEFAULT_WINDOW, EpochOrder, Layout  # noqa: E402
from trainio.loaders._order.partitions import node_partitions  # noqa: E402

PER_NODE = 8
BATCH = 8
LABELS = 10


def node_positions(order: EpochOrder, nodes: int, node: int, first_step: int, last_step: int) -> np.ndarray:
    """The global positions node ``node``'s ranks read in steps ``[first_step, last_step)``, step by step."""
    step = PER_NODE * BATCH * nodes
    share = step // nodes
    steps = np.arange(first_step, last_step, dtype=np.int64)
    positions = (steps[:, None] * step + node * share + np.arange(share, dtype=np.int64)).ravel()
    return positions[positions < order.size]


def simulate_fetch(order: EpochOrder, nodes: int, node: int, shard_bytes: np.ndarray, capacity: int) -> int:
    """Bytes node ``node`` downloads in one epoch through a cache of ``capacity`` bytes (see the module docstring)."""
    step = PER_NODE * BATCH * nodes
    parts = node_partitions(order.partitions, nodes, node)
    chunk = max(1, DEFAULT_WINDOW // step // 4)
    steps = -(-order.size // step)
    cached: dict[int, int] = {}  # shard -> last use
    used = fetched = tick = 0
    for first in range(0, steps, chunk):
        shards = order.samples(node_positions(order, nodes, node, first, min(first + chunk, steps)))[0]
        future = {s: i for i, s in enumerate(order.touched(parts, first * step, (first + 2 * chunk) * step))}
        for shard in dict.fromkeys(shards.tolist()):
            tick += 1
            if shard in cached:
                cached[shard] = tick
                continue
            fetched += int(shard_bytes[shard])
            while used + shard_bytes[shard] > capacity and cached:
                gone = [s for s in cached if s not in future]
                victim = min(gone, key=cached.__getitem__) if gone else max(cached, key=future.__getitem__)
                used -= int(shard_bytes[victim])
                del cached[victim]
            cached[shard] = tick
            used += int(shard_bytes[shard])
    return fetched


def batch_mixing(order: EpochOrder, nodes: int, label_of: np.ndarray, batches: int = 200) -> tuple[float, float, float]:
    """(distinct shards per global batch, label TV distance per global batch, distinct shards per rank batch)."""
    step = PER_NODE * BATCH * nodes
    shards = order.samples(np.arange(min(order.size, batches * step), dtype=np.int64))[0]
    per_batch = shards[:shards.size // step * step].reshape(-1, step)
    expected = np.bincount(label_of, minlength=LABELS) / label_of.size
    distinct = np.mean([np.unique(b).size for b in per_batch])
    tv = np.mean([0.5 * np.abs(np.bincount(label_of[b], minlength=LABELS) / step - expected).sum() for b in per_batch])
    rank = np.mean([np.unique(b[:BATCH]).size for b in per_batch])
    return float(distinct), float(tv), float(rank)


def scale_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = (args.rows,) * args.shards
    shard_bytes = np.full(args.shards, args.rows * args.sample_bytes, dtype=np.int64)
    label_of = np.arange(args.shards) * LABELS // args.shards
    total = int(shard_bytes.sum())
    results = []
    for nodes in args.nodes:
        for mode, partitions in (("global", 1), ("partitioned", nodes)):
            order = EpochOrder(rows, seed=1, epoch=0, window=DEFAULT_WINDOW, partitions=partitions,
                               global_batch=PER_NODE * BATCH * nodes)
            parts = node_partitions(partitions, nodes, 0)
            need = order.cache_need(parts, shard_bytes.tolist(), 0)
            started = time.perf_counter()
            fetched = simulate_fetch(order, nodes, 0, shard_bytes, need)
            distinct, tv, rank = batch_mixing(order, nodes, label_of)
            results.append({"nodes": nodes, "mode": mode, "partitions": partitions, "fetched_bytes": fetched,
                            "share_bytes": total // nodes,
                            "bound_bytes": int(1.1 * total / nodes + len(parts) * int(shard_bytes.max())),
                            "cache_need_bytes": need, "shards_per_batch": distinct, "label_tv": tv,
                            "rank_batch_shards": rank, "seconds": time.perf_counter() - started})
            print(f"  {nodes} nodes, {mode}: {fetched / 1e9:.1f} GB fetched", file=sys.stderr)
    return results


def resume_costs(args: argparse.Namespace) -> dict[str, float]:
    """Seconds to the first chunk of a rank resumed half-way through an epoch at ``--resume-ranks`` ranks."""
    ranks = args.resume_ranks
    nodes = ranks // PER_NODE
    step = ranks * BATCH
    rows = (args.rows,) * args.shards
    shard_bytes = [args.rows * args.sample_bytes] * args.shards
    started = time.perf_counter()
    order = EpochOrder(rows, seed=1, epoch=3, window=DEFAULT_WINDOW, partitions=nodes, global_batch=step)
    start = order.size // 2 // step * step
    layout = Layout(ranks, ranks - 1, 1, 0, BATCH)
    parts = node_partitions(nodes, nodes, (ranks - 1) // PER_NODE)
    positions = layout.positions(order.size, start)
    order.samples(positions[:8192])
    order.touched(parts, start, start + 2 * step)
    order.shard_sequence(parts)
    order.cache_need(parts, shard_bytes, 2)
    simulated = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        shards, per_shard = 256, 4096
        with DatasetWriter(Path(tmp) / "ds", shard_bytes=per_shard * 8, batch_rows=per_shard) as writer:
            for s in range(shards):
                writer.write_batch({"id": np.arange(s * per_shard, (s + 1) * per_shard, dtype=np.int64)})
        state = StreamingDataset(Path(tmp) / "ds", batch_size=BATCH, rank=0, world_size=ranks,
                                 ranks_per_node=PER_NODE).state_dict(consumed=(shards * per_shard // 2) // step * step)
        started = time.perf_counter()
        dataset = StreamingDataset(Path(tmp) / "ds", batch_size=BATCH, rank=ranks - 1, world_size=ranks,
                                   ranks_per_node=PER_NODE)
        dataset.load_state_dict(state)
        next(iter(dataset))
        real = time.perf_counter() - started
    return {"ranks": ranks, "partitions": nodes, "order_work_s": simulated, "streaming_first_sample_s": real}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,4,8,16,32,64")
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--sample-bytes", type=int, default=8192)
    parser.add_argument("--resume-ranks", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.nodes = [int(n) for n in args.nodes.split(",")]
    results = scale_rows(args)
    resume = resume_costs(args)
    if args.json:
        print(json.dumps({"scale": results, "resume": resume}))
        return
    print("\n".join(machine_lines(machine(["numpy"]), "(simulated: no data)")))
    print(f"dataset: {args.shards} shards x {args.rows} samples x {args.sample_bytes} B = "
          f"{args.shards * args.rows * args.sample_bytes / 1e9:.1f} GB; {PER_NODE} ranks a node, {BATCH} samples a "
          f"rank a step, shuffle window {DEFAULT_WINDOW}\n")
    table = [["nodes", "order", "P", "fetched/node GB", "x share", "bound GB", "cache need GB", "shards/batch",
              "label TV", "rank shards"]]
    for r in results:
        table.append([str(r["nodes"]), r["mode"], str(r["partitions"]), f"{r['fetched_bytes'] / 1e9:.2f}",
                      f"{r['fetched_bytes'] / r['share_bytes']:.2f}", f"{r['bound_bytes'] / 1e9:.2f}",
                      f"{r['cache_need_bytes'] / 1e9:.2f}", f"{r['shards_per_batch']:.1f}", f"{r['label_tv']:.3f}",
                      f"{r['rank_batch_shards']:.2f}"])
    print("\n".join(markdown_table(table, left=[1])))
    print(f"\nresumed half-way at {resume['ranks']} ranks ({resume['partitions']} partitions): order work to the "
          f"first chunk {resume['order_work_s']:.3f} s; a real StreamingDataset (256 local shards) to its first "
          f"sample {resume['streaming_first_sample_s']:.3f} s")


if __name__ == "__main__":
    main()
