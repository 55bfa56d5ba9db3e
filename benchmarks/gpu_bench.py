"""trainio on a CUDA GPU, against the hardware's limits and a stock DataLoader, measured side by side in one run.

Loader rows (workloads as ``loader_bench.py`` writes them: ``--size`` of 2048-token int32 samples, and of 90-110 KB
images, packed): each contender reads every sample once per epoch, page-cache warm, after an untimed warm-up epoch;
the best of ``--repeat`` epochs. GB/s counts payload bytes (10**9).

- H2D limit: ``copy_`` of 256 MiB from pinned host memory into device memory (cudaMemcpyAsync), best of 5;
- host gather: the same reused ``Loader(device="cpu")`` epoch (batches assembled in host memory, no device);
- trainio ``Loader(device="cuda")``, reused across epochs: each batch's payload is summed on the trainer's current
  stream (queued, never waited for), and the epoch ends with ``torch.cuda.synchronize()``; the target is
  >= 0.8 x min(H2D limit, host gather);
- stock ``DataLoader(pin_memory=True)``, 4 workers, over the same Arrow shards cut into batches by the workers
  (``loader_bench``'s DataLoader ceiling), each batch ``.to("cuda", non_blocking=True)``;
- trainer with compute: a Loader of batch 1024 feeding a loop whose per-batch GPU work (2048^3 bf16 matmuls) is
  sized to take 1.25x the batch's share of that Loader's own epoch time; "stream stall" is the wall time beyond
  that work alone, as a share of the wall time (0 % when the trainer's stream never waits on the loader), timed
  after the epoch's first tenth of batches; with the Loader's ``metrics()``: ``device_waits`` (groups whose copy
  was unfinished when the trainer took their first batch) and ``wait_s`` (host wait over the whole epoch).

Checkpoint rows (a transformer-shaped state of ``--state-gb`` on the GPU: bf16 weights, fp32 master and moments):

- D2H limit: ``copy_`` of every tensor into one preallocated pinned buffer (non-blocking, one synchronize);
- save blocking: how long ``save()`` holds the trainer (its snapshot into pinned staging), the first save (which
  pins its staging) and the median of the next two; target <= 1.2 x the D2H limit;
- restore into CUDA tensors in place, page-cache warm and cold (``posix_fadvise(DONTNEED)`` on every file
  first): ``gpu_direct="off"`` (pinned buffers, side stream), ``"always"`` (kvikio; cuFile in whatever mode the
  machine gives, named in the row), and the pageable path (restore into host tensors, then ``.cuda()``);
  against the H2D limit and the read limit (every step file read with 8 threads into pinned memory, unhashed).

Run:  python benchmarks/gpu_bench.py [--size 1GB] [--state-gb 4] [--repeat 3] [--dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _report as harness  # type: ignore[import-not-found]  # beside this script
import loader_bench as lb  # type: ignore[import-not-found]  # its workloads and DataLoader ceiling
import torch

from trainio.checkpoint import CheckpointManager, Tier
from trainio.checkpoint._restore.device_reads import kvikio_path
from trainio.loaders import Loader, StreamingDataset, parse_size
from trainio.tools._bench_limits import drop_from_page_cache
from trainio.tools._bench_run import tensors_of, transformer_state, zeros_like

GB = 1e9
STALL_BATCH = 1024  # the stall rows' batch: GPU work per batch well above Python's cost of launching it
Rows = list[tuple[str, str, str, str]]  # contender, GB/s or seconds, vs limit, target met


def h2d_limit(nbytes: int = 256 << 20) -> float:
    """GB/s of pinned host -> device copies."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / harness.best(lambda: _synced(lambda: device.copy_(host, non_blocking=True)), 5) / GB


def _synced(fn: Callable[[], Any]) -> None:
    fn()
    torch.cuda.synchronize()


def payload(batch: dict[str, Any], column: str) -> int:
    """Payload bytes of a batch (padding and offsets not counted)."""
    if column == "image":
        return int(batch["image"].numel())
    return int(batch["tokens"].numel()) * 4


def epoch_seconds(loader: Iterable[dict[str, Any]], column: str, expected: int, on_batch: Callable[[Any], None],
                  repeat: int) -> float:
    """Best of ``repeat`` timed epochs (after a warm-up), each checked to deliver ``expected`` payload bytes."""
    times = []
    for run in range(repeat + 1):
        harness.settle()
        start = time.perf_counter()
        got = 0
        for batch in loader:
            on_batch(batch)
            got += payload(batch, column)
        torch.cuda.synchronize()
        if run:
            times.append(time.perf_counter() - start)
        if got != expected:
            raise RuntimeError(f"an epoch delivered {got} payload bytes, not {expected}")
    return min(times)


def touch(batch: dict[str, Any]) -> None:
    """What the benchmark's trainer does with a batch: one kernel over its payload, queued, never waited for."""
    (batch["tokens"] if "tokens" in batch else batch["image"]).sum()


def trainer_stall(loader: Loader, epoch_s: float, batches: int) -> tuple[float, int, float]:
    """(stream stall share, device waits, host wait s) of an epoch whose per-batch GPU work takes 1.25x a batch's
    share of the loader's epoch, timed after its first tenth (the pipeline's start is not what a long epoch sees)."""
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    per_matmul = harness.best(lambda: _synced(lambda: [a @ a for _ in range(50)]), 3) / 50
    matmuls = max(1, round(1.25 * epoch_s / batches / per_matmul))
    skip = max(2, batches // 10)
    for _ in loader:  # warm-up
        pass
    start, counted = 0.0, 0
    for i, batch in enumerate(loader):
        if i == skip:
            torch.cuda.synchronize()
            start = time.perf_counter()
        for _ in range(matmuls):
            a @ a  # noqa: B018 - the trainer's work
        touch(batch)
        counted += i >= skip
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    alone = harness.best(lambda: _synced(lambda: [a @ a for _ in range(matmuls * counted)]), 2)
    metrics = loader.metrics()
    return max(0.0, (wall - alone) / wall), int(metrics["device_waits"]), float(metrics["wait_s"])


def loader_rows(work: Any, path: Path, shuffle: bool, repeat: int, limit: float) -> Rows:
    order = "shuffled" if shuffle else "in order"
    expected = work.payload
    rows: Rows = []

    def loader(device: str) -> Loader:
        return Loader(StreamingDataset(path, shuffle=shuffle, seed=0, batch_size=lb.BATCH), lb.BATCH,
                      device=device, lists="pack" if work.column == "image" else "pad")

    gather_s = epoch_seconds(loader("cpu"), work.column, expected, lambda b: None, repeat)
    gather = expected / gather_s / GB
    cuda = loader("cuda")
    cuda_s = epoch_seconds(cuda, work.column, expected, touch, repeat)
    ceiling = min(limit, gather)
    rate = expected / cuda_s / GB
    rows.append((f"{work.name}, {order}: host gather (Loader, cpu)", f"{gather:.2f}", "", ""))
    rows.append((f"{work.name}, {order}: trainio Loader -> cuda ({cuda.metrics()['to_device']})", f"{rate:.2f}",
                 f"{rate / ceiling:.2f} x min(H2D, gather)", harness.yes_no(rate >= 0.8 * ceiling)))
    big = Loader(StreamingDataset(path, shuffle=shuffle, seed=0, batch_size=STALL_BATCH), STALL_BATCH,
                 device="cuda", lists="pack" if work.column == "image" else "pad")
    big_s = epoch_seconds(big, work.column, expected, touch, 1)
    stall, waits, waited = trainer_stall(big, big_s, int(big.metrics()["batches"]))
    rows.append((f"{work.name}, {order}: trainer with compute, batch {STALL_BATCH}: stream stall", f"{stall:.1%}",
                 f"{waits} copies unfinished at hand-over; host wait {waited * 1e3:.0f} ms",
                 harness.yes_no(stall < 0.05)))
    dataset = lb.ArrowBatches(path, work.name, lb.BATCH, shuffle, 0)
    stock = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=4, persistent_workers=True,
                                        pin_memory=True, worker_init_fn=lb.one_thread, multiprocessing_context="fork")

    def moved() -> Iterable[dict[str, Any]]:
        for batch in stock:
            yield {k: v.to("cuda", non_blocking=True) for k, v in batch.items() if k != "image_offsets"}

    stock_s = epoch_seconds(_Reiterable(moved), work.column, expected, touch, repeat)
    stock_rate = expected / stock_s / GB
    rows.append((f"{work.name}, {order}: DataLoader(pin_memory=True, 4 workers) -> cuda", f"{stock_rate:.2f}",
                 f"trainio {rate / stock_rate:.2f} x", ""))
    return rows


class _Reiterable:
    def __init__(self, make: Callable[[], Iterable[Any]]) -> None:
        self.make = make

    def __iter__(self) -> Any:
        return iter(self.make())


def cuda_state(gb: float) -> dict[str, Any]:
    state = transformer_state(gb * GB, width=1024, full=True)

    def moved(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.cuda()
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        return value

    return moved(state)  # type: ignore[no-any-return]


def read_limit(files: list[Path], threads: int = 8) -> float:
    """Seconds to read ``files`` into pinned memory with ``threads`` threads, unhashed."""
    buffers = [torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True).numpy() for _ in range(threads)]

    def read(args: tuple[int, Path]) -> int:
        i, path = args
        view = memoryview(buffers[i % threads])
        done = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                done += n
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, enumerate(files)))
    return time.perf_counter() - start


def restore_into(tier: Path, mode: str, target: Any, repeat: int, prepare: Callable[[], Any]) -> tuple[float, Any]:
    """Best seconds of ``repeat`` restores into ``target`` with ``gpu_direct=mode``, and the last one's report."""
    reports: list[Any] = []
    with CheckpointManager([Tier(tier)], read_only=True, gpu_direct=mode, threads=8) as manager:
        seconds = harness.best(lambda: reports.append(manager.restore_with_report(into=target)[1]), repeat,
                               before=prepare)
    return seconds, reports[-1]


def checkpoint_rows(root: Path, gb: float, repeat: int, limit: float) -> Rows:
    state = cuda_state(gb)
    tensors = [t for t in tensors_of(state) if t.is_cuda]
    nbytes = sum(t.nbytes for t in tensors)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def d2h() -> None:
        offset = 0
        for t in tensors:
            pinned[offset:offset + t.nbytes].view(t.dtype).view(t.shape).copy_(t, non_blocking=True)
            offset += t.nbytes
        torch.cuda.synchronize()

    d2h_s = harness.best(d2h, 3)
    rows: Rows = [(f"state: {len(tensors)} CUDA tensors, {nbytes / GB:.2f} GB", "", "", ""),
                  ("D2H limit: copy into preallocated pinned memory", f"{d2h_s:.3f} s", f"{nbytes / d2h_s / GB:.1f} GB/s",
                   "")]
    tier = root / "ckpt"
    blocking = []
    with CheckpointManager([Tier(tier, keep_last=1)]) as manager:
        for step in range(1, 4):
            manager.wait()  # the last save's promotion and retention done, as minutes of training would leave them
            time.sleep(1)
            torch.cuda.synchronize()
            start = time.perf_counter()
            handle = manager.save(step, state)
            blocking.append(time.perf_counter() - start)
            handle.wait()
    steady = statistics.median(blocking[1:])
    rows.append(("save blocking, first save (pins its staging)", f"{blocking[0]:.3f} s",
                 f"{blocking[0] / d2h_s:.2f} x D2H", ""))
    rows.append(("save blocking, later saves (median of 2)", f"{steady:.3f} s", f"{steady / d2h_s:.2f} x D2H",
                 harness.yes_no(steady <= 1.2 * d2h_s)))
    files = [p for p in (tier / f"{3:012d}").rglob("*") if p.is_file()]
    on_disk = sum(p.stat().st_size for p in files)
    target = zeros_like(state)
    h2d_s = nbytes / (limit * GB)
    path_name = kvikio_path() or "kvikio not installed"
    for cold in (False, True):
        prepare = (lambda: drop_from_page_cache(files)) if cold else (lambda: read_limit(files))
        temp = "cold" if cold else "warm"
        read_s = harness.best(lambda: read_limit(files), repeat, before=prepare)
        rows.append((f"read limit, {temp}: the step's files, 8 threads into pinned memory",
                     f"{read_s:.3f} s", f"{on_disk / read_s / GB:.1f} GB/s", ""))
        bound = max(read_s, h2d_s)
        for mode in ("off", "always"):
            if mode == "always" and kvikio_path() is None:
                rows.append((f"restore {temp}, kvikio", "-", "kvikio not installed", ""))
                continue
            restore_s, report = restore_into(tier, mode, target, repeat, prepare)
            rows.append((f"restore {temp} into CUDA tensors, gpu_direct={mode!r} ({report.to_device or path_name})",
                         f"{restore_s:.3f} s", f"{bound / restore_s:.2f} x max(read, H2D) limit", ""))
        with CheckpointManager([Tier(tier)], read_only=True, threads=8) as manager:
            pageable_s = harness.best(lambda: _synced(lambda: [t.cuda() for t in tensors_of(manager.restore())]),
                                      repeat, before=prepare)
        rows.append((f"restore {temp} into host tensors, then .cuda() (pageable)", f"{pageable_s:.3f} s",
                     f"{bound / pageable_s:.2f} x max(read, H2D) limit", ""))
    for got, want in zip(tensors_of(target), tensors_of(state), strict=True):
        if isinstance(want, torch.Tensor) and not torch.equal(got, want):
            raise RuntimeError("a restored tensor differs from the saved one")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GB")
    parser.add_argument("--state-gb", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip", default="", help="comma-separated: loader, checkpoint")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench needs a CUDA device")
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="trainio-gpu-bench-"))
    limit = h2d_limit()
    rows: Rows = [(f"H2D limit: pinned host -> {torch.cuda.get_device_name()}", f"{limit:.1f}", "", "")]
    if "loader" not in args.skip:
        for name in ("tokens", "images"):
            work = lb.make_workload(name, parse_size(args.size))
            path = root / name
            lb.write_trainio(work, path)
            for shuffle in (False, True):
                rows.extend(loader_rows(work, path, shuffle, args.repeat, limit))
    if "checkpoint" not in args.skip:
        rows.extend(checkpoint_rows(root, args.state_gb, args.repeat, limit))
    machine = harness.machine(("torch", "pyarrow", "numpy", "trainio", "kvikio-cu13"))
    lines = harness.machine_lines(machine, str(root)) + [f"gpu: {torch.cuda.get_device_name()}", ""]
    table = [("contender", "GB/s or time", "vs", "target met"), *rows]
    print(harness.report_text(lines + harness.markdown_table(table, left=[0, 2]), []))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
