"""The phases of ``trainio bench``: make a dataset, verify it, stream it, checkpoint a state, measure the limits.

Each phase returns plain numbers (seconds, bytes, rates) that the command
prints as a table or one JSON document; the loader phase also keeps its
throughput over time and the checkpoint phase its timeline, for ``--plot``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from trainio.loaders import DatasetWriter, verify_dataset
from trainio.storage import open_store

from . import _bench_limits as limits
from ._bench_limits import interleaved

TOKENS = 2048
"""Tokens per sample of the ``tokens`` workload (int32)."""

IMAGE_BYTES = (8 << 10, 32 << 10)
"""Smallest and largest sample of the ``images`` workload (encoded-image-sized byte strings)."""

BATCH = 64
"""Samples per loader batch."""

LOADER_THREADS = 2
"""Threads of the Loader (its default); the limit that reads the same files runs one more, as the shard checker."""

_ROWS_PER_BATCH = 256


def _chunks(rows: int) -> Iterator[tuple[int, int]]:
    for k, start in enumerate(range(0, rows, _ROWS_PER_BATCH)):
        yield k, min(_ROWS_PER_BATCH, rows - start)


def _column(workload: str, k: int, n: int) -> pa.Array:
    rng = np.random.default_rng([7, k])
    if workload == "tokens":
        values = pa.array(rng.integers(0, 50_000, n * TOKENS, dtype=np.int32))
        return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * TOKENS, TOKENS, dtype=np.int32)), values)
    lengths = rng.integers(IMAGE_BYTES[0], IMAGE_BYTES[1] + 1, n)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    payload = rng.bytes(int(offsets[-1]))
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(payload)])


@dataclass
class DataResult:
    """The dataset phase: what was written and verified, and the write against write+fsync of the same bytes."""

    url: str
    rows: int
    bytes: int
    shards: int
    write_s: float
    write_limit_s: float
    verify_s: float
    verified: bool


def make_dataset(work: Path, workload: str, size: int, rounds: int, progress: Callable[[int], None]) -> DataResult:
    """Write a synthetic dataset of about ``size`` payload bytes to ``work/dataset`` with the dataset writer, verify it.

    The write is timed ``rounds`` times (the samples are made before the
    clock starts), in turn with two runs of its limit: new files of the
    shards' size, of bytes like the shards', made durable. The first write
    is kept.

    Raises:
        ValueError: the size is too small for one batch of samples.
    """
    per_row = 4 * TOKENS if workload == "tokens" else sum(IMAGE_BYTES) // 2
    rows = size // per_row
    if rows < BATCH:
        raise ValueError(f"--size {size} bytes holds {rows} {workload} samples; give at least "
                         f"{BATCH * per_row / 1e6:.1f} MB")
    columns = [_column(workload, k, n) for k, n in itertools.islice(_chunks(rows), 16)]  # reused, made untimed
    name = "tokens" if workload == "tokens" else "image"
    shard_bytes = max(1 << 20, min(256 << 20, size // 8))
    written = [0]  # runs so far

    def write() -> float:
        target = work / ("dataset" if not written[0] else "dataset-again")
        started = time.perf_counter()
        with DatasetWriter(target, shard_bytes=shard_bytes, overwrite=True) as writer:
            for k, n in _chunks(rows):
                column = columns[k % len(columns)].slice(0, n)
                writer.write_batch({name: column})
                if not written[0]:
                    progress(column.nbytes)
        seconds = time.perf_counter() - started
        written[0] += 1
        if target.name != "dataset":
            shutil.rmtree(target)
            os.sync()  # the deleted blocks discarded now, not in the next run
        return seconds

    write()  # the dataset the later phases read: the limit writes bytes like its files
    files = [pa.memory_map(str(p)) for p in sorted((work / "dataset").rglob("*.arrow"))]
    like = [memoryview(f.read_buffer()) for f in files]
    durable = limits.DurableWrite(work, like, 1, shard_bytes)
    # Two runs of the limit a round, so that each of its ways is tried in more than one of this disk's moods.
    write_s, limit_s = interleaved(write, lambda: min(durable(), durable()), rounds)
    del like
    for f in files:
        f.close()
    started = time.perf_counter()
    report = verify_dataset(open_store(work / "dataset"))
    verify_s = time.perf_counter() - started
    return DataResult(str(work / "dataset"), report.rows, report.bytes, report.shards, write_s, limit_s, verify_s,
                      report.ok)


@dataclass
class StreamResult:
    """One loader row: the first epoch of a new StreamingDataset + Loader against reading the same shard files."""

    samples: int
    bytes: int
    seconds: float
    limit_s: float
    wait_s: float
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes so far)

    @property
    def bytes_per_s(self) -> float:
        """Payload bytes delivered per second."""
        return self.bytes / self.seconds

    @property
    def limit_bytes_per_s(self) -> float:
        """The limit's read rate of the same files, in payload bytes per second (so the two compare)."""
        return self.bytes / self.limit_s


def stream_epochs(url: Path, device: str, rounds: int, cold: bool,
                  progress: Callable[[int], None]) -> StreamResult:
    """The first epoch (shuffled) of a new dataset and Loader per round, in turn with the limit.

    The limit reads every byte of the shard files with as many threads as
    the Loader reads them with (its threads and the shard checker's). Warm:
    the files are read once before each run. Cold: their pages are dropped
    before each run (``posix_fadvise(DONTNEED)``), for trainio and the limit
    alike. Every run checks every row against its digest (or, for shards
    without row digests, every shard's hash), as a training job's first
    epoch does.
    """
    from trainio.loaders._loader import Loader
    from trainio.loaders._read.shard_check import forget_verified
    from trainio.loaders._streaming import StreamingDataset

    files = sorted(url.rglob("*.arrow"))
    prepare = limits.drop_from_page_cache if cold else limits.read_into_page_cache
    runs: list[tuple[float, float, int, int, list[tuple[float, int]]]] = []

    def epoch() -> float:
        prepare(files)
        forget_verified()
        started = time.perf_counter()
        loader = Loader(StreamingDataset(url, shuffle=True, seed=len(runs)), batch_size=BATCH, device=device)
        timeline: list[tuple[float, int]] = []
        for _ in loader:
            done = int(loader.metrics()["bytes"])
            if not runs:
                progress(done - (timeline[-1][1] if timeline else 0))
            timeline.append((time.perf_counter() - started, done))
        seconds = time.perf_counter() - started
        metrics = loader.metrics()
        runs.append((seconds, float(metrics["wait_s"]), int(metrics["samples"]), int(metrics["bytes"]), timeline))
        return seconds

    def limit() -> float:
        prepare(files)
        return limits.read_files(files, threads=LOADER_THREADS + 1)

    seconds, limit_s = interleaved(epoch, limit, rounds)
    median = min(runs, key=lambda r: abs(r[0] - seconds))
    return StreamResult(median[2], median[3], seconds, limit_s, median[1], median[4])


def transformer_state(nbytes: float, *, width: int | None = None, full: bool = False) -> dict[str, Any]:
    """A training state shaped like a transformer's, of about ``nbytes`` (the layers' bytes; the extras add a little).

    bf16 weights (per layer: the attention and MLP matrices, their biases, two
    norms) and an AdamW-like optimizer: an fp32 master copy and two fp32
    moments per parameter, 14 bytes a parameter in all. ``width`` is the
    model dimension (default 256 below 256 MiB, else 1024). ``full`` adds
    what a real model has besides (``benchmarks/checkpoint_bench.py`` uses
    it): an 8192-row embedding, q and k norms in every layer, a final norm,
    and the RNG state. ``trainio bench`` and ``benchmarks/checkpoint_bench.py``
    both take their state from here.
    """
    import torch

    d = width or (256 if nbytes < 256 << 20 else 1024)
    per_layer = (12 * d * d + 13 * d) * (2 + 3 * 4)
    layers = max(1, round(nbytes / per_layer))
    norms = ("norm1", "norm2", "attn.q_norm", "attn.k_norm") if full else ("norm1", "norm2")
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (8192, d)} if full else {}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
                       p + "attn.out.weight": (d, d), p + "attn.out.bias": (d,),
                       p + "mlp.up.weight": (4 * d, d), p + "mlp.up.bias": (4 * d,),
                       p + "mlp.down.weight": (d, 4 * d), p + "mlp.down.bias": (d,)})
        for norm in norms:
            shapes[p + norm + ".weight"] = (d,)
            shapes[p + norm + ".bias"] = (d,)
    if full:
        shapes["final_norm.weight"] = (d,)
    g = torch.Generator().manual_seed(0)
    model = {k: torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()}
    state = {i: {"step": torch.tensor(100.0), "master": model[k].float(),
                 "exp_avg": torch.randn(s, generator=g) * 1e-3, "exp_avg_sq": torch.rand(s, generator=g) * 1e-6}
             for i, (k, s) in enumerate(shapes.items())}
    optim = {"state": state, "param_groups": [{"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                               "params": list(range(len(shapes)))}]}
    return {"model": model, "optim": optim, "step": 100, **({"rng": torch.get_rng_state()} if full else {})}


def tensors_of(state: Any) -> list[Any]:
    """Every tensor of a nested state, in order."""
    if hasattr(state, "element_size"):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors_of(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in tensors_of(v)]
    return []


def checkpoint_bytes(size: int) -> int:
    """How big a state to checkpoint: ``size``, or less where free memory is short (it is held ~4 times)."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = 4 << 30
    return max(8 << 20, min(size, free // 8))


@dataclass
class CheckpointResult:
    """The checkpoint phase: saves through two tiers, each figure the median of the rounds, with its limit.

    ``first_blocked_s``: the first save of a manager that allocates its
    staging memory then; ``reserve_s`` and ``reserved_first_blocked_s``: a
    manager that reserves it first (``reserve_staging``), and its first save.
    Every save changes every tensor first (so nothing is linked from the
    step before). Limits, the disk's run in turn with its figure:
    ``memcpy_s`` (the tensors copied into touched memory), ``write_fsync_s``
    (the state's bytes written in files of the manager's chunk size with as
    many threads as the manager, each fsynced), ``read_s`` (the step's files
    read from the page cache with as many threads), ``copy_s`` (their sum:
    a promotion reads tier 1 and writes tier 2; 0 when the last tier is
    remote, as is ``read_s``).
    """

    bytes: int
    tensors: int
    first_blocked_s: float
    reserve_s: float
    reserved_first_blocked_s: float
    blocked_s: float
    commit_s: float
    promote_s: float
    restore_s: float
    memcpy_s: float
    write_fsync_s: float
    copy_s: float
    read_s: float
    bit_exact: bool
    tiers: list[str]


def checkpoint_rounds(state: dict[str, Any], tiers: list[Any], work: Path, rounds: int,
                      progress: Callable[[str], None] = lambda _: None) -> CheckpointResult:
    """Save ``state`` as :class:`CheckpointResult` says (through ``tiers``), restore it and compare.

    ``progress`` is called with the name of each stage as it is done.
    """
    import torch

    from trainio.checkpoint import CheckpointManager, Tier

    tensors = tensors_of(state)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    with CheckpointManager([Tier(work / "ckpt-first", keep_last=1)]) as manager:
        started = time.perf_counter()
        handle = manager.save(1, state)
        first_blocked = time.perf_counter() - started
        handle.result()
    shutil.rmtree(work / "ckpt-first", ignore_errors=True)
    progress("first save")
    with CheckpointManager(tiers, promote_attempts=1) as manager:
        labels = [t.label for t in manager.tiers]
        started = time.perf_counter()
        manager.reserve_staging(state)
        reserve = time.perf_counter() - started
        steps: dict[str, list[float]] = {"blocked": [], "commit": [], "promote": []}

        def save() -> float:
            with torch.no_grad():
                for tensor in tensors:
                    tensor.neg_() if tensor.is_floating_point() else tensor.add_(1)  # a training step later
            step = len(steps["blocked"]) + 1
            started = time.perf_counter()
            handle = manager.save(step, state)
            steps["blocked"].append(time.perf_counter() - started)
            handle.wait()
            steps["commit"].append(time.perf_counter() - started)
            results = handle.result()
            if any(r.status != "committed" for r in results.values()):
                failed = {k: f"{r.status}: {r.error}" for k, r in results.items() if r.status != "committed"}
                raise OSError(f"checkpoint: step {step} did not reach every tier: {failed}")
            steps["promote"].append(max(results[labels[-1]].seconds - steps["commit"][-1], 0.0))
            return steps["commit"][-1]

        copy = limits.memcpy(tensors)
        memcpy_s = min(copy() for _ in range(max(1, rounds)))
        threads = manager.options.threads
        views = [memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) for t in tensors]
        durable = limits.DurableWrite(work, views, threads, manager.options.chunk_bytes)
        commit, write_s = interleaved(save, lambda: min(durable(), durable()), max(2, rounds + 1))  # see make_dataset
        progress("saves")
        last = len(steps["blocked"])
        root = manager.tiers[-1].url
        path = os.fspath(root) if isinstance(root, (str, os.PathLike)) else ""
        files = [p for p in Path(path, f"{last:012d}").rglob("*") if p.is_file()] if path and "://" not in path else []
        target = zeros_like(state)

        def restore() -> float:
            started = time.perf_counter()
            manager.restore(last, into=target, tiers=[labels[-1]])
            return time.perf_counter() - started

        if files:
            into = limits.destination(files)  # a restore puts every byte in a place of its own
            restore_s, read_s = interleaved(restore, partial(limits.fastest_warm_read, files, threads, into), rounds)
            copy_s = read_s + write_s
        else:  # a remote tier: no local limit to read against
            restore_s, read_s, copy_s = statistics.median(restore() for _ in range(max(1, rounds))), 0.0, 0.0
        progress("restore")
    same = all(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
               for a, b in zip(tensors_of(target), tensors, strict=True))
    return CheckpointResult(nbytes, len(tensors), first_blocked, reserve, steps["blocked"][0],
                            statistics.median(steps["blocked"][1:]), commit, statistics.median(steps["promote"]),
                            restore_s, memcpy_s, write_s, copy_s, read_s, same, labels)


def zeros_like(state: Any) -> Any:
    """A state of the same shape with fresh, zeroed tensors (a restore target); DTensors keep their placements."""
    if hasattr(state, "device_mesh"):
        import torch
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(torch.zeros_like(state.to_local()), state.device_mesh, state.placements,
                                  shape=state.shape, stride=state.stride())
    if hasattr(state, "element_size"):
        import torch

        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: zeros_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [zeros_like(v) for v in state]
    return state
