"""The phases of ``trainio bench``: make a dataset, verify it, stream it, checkpoint a state, measure the limits.

Each phase returns plain numbers (seconds, bytes, rates) that the command
prints as a table or one JSON document; the loader phase also keeps its
throughput over time and the checkpoint phase its timeline, for ``--plot``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from trainio.loaders import DatasetWriter, verify_dataset
from trainio.storage import open_store

TOKENS = 2048
"""Tokens per sample of the ``tokens`` workload (int32)."""

IMAGE_BYTES = (8 << 10, 32 << 10)
"""Smallest and largest sample of the ``images`` workload (encoded-image-sized byte strings)."""

BATCH = 64
"""Samples per loader batch."""

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
    """The dataset phase: what was written and verified."""

    url: str
    rows: int
    bytes: int
    shards: int
    write_s: float
    verify_s: float
    verified: bool


def make_dataset(out: Path, workload: str, size: int, progress: Callable[[int], None]) -> DataResult:
    """Write a synthetic dataset of about ``size`` payload bytes to ``out`` with the dataset writer, sync, verify it.

    Raises:
        ValueError: the size is too small for one batch of samples.
    """
    per_row = 4 * TOKENS if workload == "tokens" else sum(IMAGE_BYTES) // 2
    rows = size // per_row
    if rows < BATCH:
        raise ValueError(f"--size {size} bytes holds {rows} {workload} samples; give at least "
                         f"{BATCH * per_row / 1e6:.1f} MB")
    started = time.perf_counter()
    with DatasetWriter(out, shard_bytes=max(1 << 20, min(256 << 20, size // 8))) as writer:
        for k, n in _chunks(rows):
            column = _column(workload, k, n)
            writer.write_batch({"tokens" if workload == "tokens" else "image": column})
            progress(column.nbytes)
    os.sync()  # durable, like the limit it is compared with; and no write-back left to disturb the next phases
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    report = verify_dataset(open_store(out))
    verify_s = time.perf_counter() - started
    return DataResult(str(out), report.rows, report.bytes, report.shards, write_s, verify_s, report.ok)


@dataclass
class StreamResult:
    """The loader phase: one epoch through StreamingDataset + Loader."""

    device: str
    samples: int
    bytes: int
    seconds: float
    wait_s: float
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes so far)

    @property
    def samples_per_s(self) -> float:
        """Samples delivered per second."""
        return self.samples / self.seconds

    @property
    def bytes_per_s(self) -> float:
        """Payload bytes delivered per second."""
        return self.bytes / self.seconds


def stream_epoch(url: Path, device: str, progress: Callable[[int], None]) -> StreamResult:
    """Stream one shuffled epoch of the dataset at ``url`` to ``device`` and measure it."""
    from trainio.loaders._loader import Loader
    from trainio.loaders._streaming import StreamingDataset

    dataset = StreamingDataset(url, shuffle=True, seed=0)
    loader = Loader(dataset, batch_size=BATCH, device=device)
    timeline: list[tuple[float, int]] = []
    started = time.perf_counter()
    done = 0
    for _ in loader:
        metrics = loader.metrics()
        progress(int(metrics["bytes"]) - done)
        done = int(metrics["bytes"])
        timeline.append((time.perf_counter() - started, done))
    metrics = loader.metrics()
    return StreamResult(device, int(metrics["samples"]), int(metrics["bytes"]), float(metrics["seconds"]),
                        float(metrics["wait_s"]), timeline)


def read_seconds(files: list[Path], repeat: int = 2) -> float:
    """Seconds to read ``files`` (from the page cache once warm) into one reused buffer: the streaming limit."""
    buffer = bytearray(max(f.stat().st_size for f in files))

    def read_all() -> None:
        view = memoryview(buffer)
        for file in files:
            with open(file, "rb", buffering=0) as f:
                f.readinto(view)

    return best_of(read_all, repeat)


def best_of(fn: Callable[[], Any], repeat: int) -> float:
    """The shortest of ``repeat`` timed runs of ``fn``, in seconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return max(min(times), 1e-9)


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
    """The checkpoint phase: saves through two tiers, then a verified restore.

    The first save allocates and faults in the staging memory that later
    saves reuse; the times are those of the second save, of a state in which
    every tensor changed (so nothing is linked from the first).
    """

    bytes: int
    tensors: int
    first_blocked_s: float
    blocked_s: float
    commit_s: float
    promote_s: float
    restore_s: float
    bit_exact: bool
    tiers: list[str]


def checkpoint_round(state: dict[str, Any], tiers: list[Any],
                     progress: Callable[[str], None] = lambda _: None) -> CheckpointResult:
    """Save ``state`` as step 1, change it, save step 2 and wait for its promotion, restore it and compare.

    ``progress`` is called with the name of each stage as it is done.
    """
    import torch

    from trainio.checkpoint import CheckpointManager

    tensors = tensors_of(state)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    with CheckpointManager(tiers, promote_attempts=1) as manager:
        labels = [t.label for t in manager.tiers]
        started = time.perf_counter()
        first = manager.save(1, state)
        first_blocked = time.perf_counter() - started
        first.result()
        progress("first save")
        with torch.no_grad():
            for tensor in tensors:
                tensor.neg_() if tensor.is_floating_point() else tensor.add_(1)  # a training step later
        started = time.perf_counter()
        handle = manager.save(2, state)
        blocked = time.perf_counter() - started
        handle.wait()
        commit = time.perf_counter() - started
        progress("commit")
        results = handle.result()
        progress("promote")
        promote = results[labels[-1]].seconds - commit if len(labels) > 1 else 0.0
        if any(r.status != "committed" for r in results.values()):
            failed = {k: f"{r.status}: {r.error}" for k, r in results.items() if r.status != "committed"}
            raise OSError(f"checkpoint: step 2 did not reach every tier: {failed}")
        target = zeros_like(state)
        started = time.perf_counter()
        restored = manager.restore(2, into=target, tiers=[labels[-1]])
        restore = time.perf_counter() - started
        progress("restore")
    same = all(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
               for a, b in zip(tensors_of(restored), tensors, strict=True))
    return CheckpointResult(nbytes, len(tensors), first_blocked, blocked, commit, max(promote, 0.0), restore, same,
                            labels)


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


def memcpy_limit(tensors: list[Any]) -> float:
    """Seconds to copy ``tensors`` into preallocated, touched buffers (the floor of a save's blocking time)."""
    import torch

    copies = [torch.zeros_like(t) for t in tensors]
    return best_of(lambda: [c.copy_(t) for c, t in zip(copies, tensors, strict=True)], 2)


def write_limit(directory: Path, nbytes: int) -> tuple[float, float]:
    """Seconds to write+fsync ``nbytes`` to one file in ``directory``, and to read them back from the page cache."""
    path = directory / "limit.bin"
    block = np.random.default_rng(0).bytes(min(nbytes, 64 << 20))
    blocks = math.ceil(nbytes / len(block))

    def write() -> None:
        with open(path, "wb", buffering=0) as f:
            for _ in range(blocks):
                f.write(block)
            os.fsync(f.fileno())

    try:
        write_s = best_of(write, 2)
        read_s = read_seconds([path])
    finally:
        path.unlink(missing_ok=True)
    return write_s * nbytes / (blocks * len(block)), read_s * nbytes / (blocks * len(block))
