"""loader_bench's packing rows: documents of random lengths packed into fixed-length token sequences.

The workload: ``nbytes`` of int32 token documents of 50-4000 tokens (uniform), in a trainio dataset. Contenders,
page cache warm, run in turn ``repeat`` times (the median): trainio ``PackedLoader(StreamingDataset(...), 8,
PackTokens("tokens", 2048, eos=0))``, shuffled, against reading the same documents per sample with
``StreamingDataset`` (what packing starts from) and a plain numpy concatenation of every document into one
buffer (the copy packing cannot avoid). Tokens/s and GB/s of int32 tokens delivered.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from trainio.loaders import DatasetWriter, PackedLoader, PackTokens, StreamingDataset


def make_documents(path: Path, nbytes: int) -> int:
    """Write about ``nbytes`` of token documents; how many tokens."""
    rng = np.random.default_rng(0)
    total = 0
    with DatasetWriter(path, shard_bytes=128 << 20, batch_rows=256) as writer:
        while total * 4 < nbytes:
            lengths = rng.integers(50, 4001, 256)
            values = rng.integers(1, 50_000, int(lengths.sum()), dtype=np.int32)
            writer.write_batch({"tokens": np.split(values, np.cumsum(lengths)[:-1])})
            total += int(lengths.sum())
    return total


def rows(root: Path, nbytes: int, repeat: int) -> list[dict[str, Any]]:
    """Each contender's median tokens/s over ``repeat`` epochs run in turn."""
    path = root / "documents"
    tokens = make_documents(path, nbytes)
    dataset = StreamingDataset(path, seed=0)
    packed = PackedLoader(StreamingDataset(path, seed=0), 8, PackTokens("tokens", 2048, eos=0))
    every = [d["tokens"] for d in StreamingDataset(path, shuffle=False)]
    out = np.empty(tokens, dtype=np.int32)

    def pack_epoch() -> int:
        return sum(int(b["mask"].sum()) for b in packed)

    def per_sample() -> int:
        return sum(len(d["tokens"]) for d in dataset)

    def concatenate() -> int:
        np.concatenate(every, out=out)
        return tokens

    contenders = {"trainio PackedLoader (8 x 2048, shuffled)": pack_epoch,
                  "trainio StreamingDataset per document (shuffled)": per_sample,
                  "numpy concatenate of every document (the copy)": concatenate}
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    for run in contenders.values():
        run()  # warm-up
    for _ in range(repeat):
        for name, run in contenders.items():
            started = time.perf_counter()
            run()
            runs[name].append(time.perf_counter() - started)
    return [{"contender": name, "tokens_per_s": tokens / statistics.median(t),
             "gb_per_s": 4 * tokens / statistics.median(t) / 1e9} for name, t in runs.items()]


def render(found: list[dict[str, Any]]) -> str:
    """The rows as a table."""
    lines = ["| contender | tokens/s | GB/s (int32) |", "|---|---|---|"]
    lines += [f"| {r['contender']} | {r['tokens_per_s']:,.0f} | {r['gb_per_s']:.2f} |" for r in found]
    return "\n".join(lines)
