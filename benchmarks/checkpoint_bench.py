"""Checkpoint save and restore: trainio against torch.save, torch.distributed.checkpoint and the raw limits.

The state is shaped like a transformer's training state: bf16 weight
matrices, several hundred small biases and norms, and an Adam-like optimizer
(fp32 master copy and two moments per parameter), about ``--gb`` GB in all.

Rows, all measured in this run on the same state and directory:
- memcpy: copy of the state into preallocated, touched tensors, once before each of trainio's saves (the floor for
  the time a save may block the caller);
- raw write+sync / raw read: the state's bytes as new files of trainio's chunk
  size, written with trainio's threads and made durable, and read with as many;
- trainio: ``save`` blocking time, time to committed on tier 0 (durable), and
  ``restore(into=...)`` warm and cold, every file it reads hash-checked;
- torch.save + fsync / torch.load; dcp.save / dcp.load; dcp.async_save
  (blocking, and total to done).
Every restore row (trainio's, the peers', the raw read) is the median of
``--repeat`` rounds in which each reader runs once, warm then cold, in an
order that reverses each round (cold: every reader's files dropped, ``sync``,
half a second to settle), so that the disk's drift hits all alike; the other
rows are the best of ``--repeat`` runs.
Then a many-small-tensors table: per-tensor cost of writing and reading
thousands of small tensors with trainio, as raw files, and with zarr-python.
Finally the training-loop slowdown while a save is flushed in the background.

Cold reads use posix_fadvise(DONTNEED) on every file, after an fsync.

With ``--ranks N`` it measures instead one state sharded over N local gloo
ranks (DTensors, Shard(0)): trainio's collective save and restore against
dcp.save / dcp.async_save / dcp.load and the raw limits on every rank (_ckpt_ranks.py).

Run:  python benchmarks/checkpoint_bench.py [--gb 1] [--repeat 3] [--dir /tmp/ckpt-bench] [--small 2000] [--ranks 2 [--nodes 2]]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _files import fsync_path  # noqa: E402
from _report import best, machine, machine_lines, markdown_table, timed  # noqa: E402
from _report import in_turn as order_of_round  # noqa: E402

from trainio.checkpoint import CheckpointManager, CheckpointOptions, Tier  # noqa: E402
from trainio.tools._bench_limits import (  # noqa: E402
    READ_WAYS,
    DurableWrite,
    destination,
    drop_from_page_cache,
    read_files,
    sample_of,
)
from trainio.tools._bench_run import tensors_of, transformer_state  # noqa: E402
from trainio.tools._bench_run import zeros_like as like  # noqa: E402


def state_of(gb: float) -> dict[str, Any]:
    """The benchmark's state: ``transformer_state`` (shared with ``trainio bench``) of ``gb`` GB, 1024 wide, full."""
    return transformer_state(gb * 1e9, width=1024, full=True)


def drop_cache(path: Path) -> None:
    """Evict ``path``'s files (a file, or every file under a directory) from the page cache."""
    drop_from_page_cache([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()])


def fresh(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def fresh_steps(tier: Path) -> None:
    """Drop every step of a tier so the next save cannot link their files (measure full writes)."""
    for p in tier.iterdir():
        if p.name.isdigit():
            shutil.rmtree(p)
    os.sync()


class Bench:
    """The big-state table."""

    def __init__(self, root: Path, state: dict[str, Any], repeat: int) -> None:
        self.root = root
        self.state = state
        self.repeat = repeat
        self.tensors = tensors_of(state)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)
        self.rows: list[tuple[str, str, float]] = []
        self.notes: list[str] = []
        self.raw_files: list[Path] = []  # the read limit's files (raw), read in turn with every restore
        self.readers: list[tuple[str, Callable[[], Any], Path]] = []  # (who, restore, its files), read in turn
        self.copy: Callable[[], None] = lambda: None  # the memcpy floor (:meth:`memcpy`)
        self.open = contextlib.ExitStack()  # what the readers need until :meth:`restores` is done

    def add(self, what: str, who: str, seconds: float) -> None:
        self.rows.append((what, who, seconds))
        print(f"  {what:34} {who:30} {seconds:8.3f} s  {self.nbytes / seconds / 1e9:6.2f} GB/s", flush=True)

    def memcpy(self) -> None:
        """The blocking save's floor, a copy of every tensor into preallocated ones: made ready here, timed in turn
        with trainio's saves (:meth:`trainio`), so that the machine's drift hits both."""
        targets = [torch.empty_like(t) for t in self.tensors]
        for t in targets:
            t.zero_()

        def copy() -> None:
            for dst, src in zip(targets, self.tensors, strict=True):
                dst.copy_(src)

        self.copy = copy

    def raw(self) -> None:
        """The limits, with trainio's parallelism: its threads writing new files of its chunk size made durable
        (the fastest of the ways :class:`DurableWrite` tries), and such files for reading, which :meth:`restores_in_turn` reads
        in turn with trainio's restores, warm and cold (dropped from the page cache)."""
        options = CheckpointOptions()
        views = [memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) for t in self.tensors]
        write = DurableWrite(self.root, views, options.threads, options.chunk_bytes)
        itself = lambda run: run()  # noqa: E731 - the limits time their own timed part
        runs = max(self.repeat + 1, 2 * len(DurableWrite.WAYS))  # each way twice: the disk's moods change by the minute
        self.add("durable save", f"raw write+sync, {options.threads} threads", best(write, runs, timer=itself))
        path = self.root / "raw"
        path.mkdir(exist_ok=True)
        flat = sample_of(views, 64 << 20)
        files = []
        for i, start in enumerate(range(0, self.nbytes, options.chunk_bytes)):
            files.append(path / f"{i}.bin")
            size = min(options.chunk_bytes, self.nbytes - start)
            files[-1].write_bytes((flat * (size // len(flat) + 1))[:size])
        os.sync()
        self.raw_files = files

    def trainio(self, compression: str | None = None) -> None:
        tier = self.root / ("trainio" if compression is None else f"trainio-{compression}")
        who = "trainio" if compression is None else f"trainio {compression}"
        fresh(tier)
        self.open.callback(fresh, tier)  # after the manager is closed
        manager = self.open.enter_context(CheckpointManager([Tier(tier, keep_last=1)], compression=compression))
        manager.save(0, self.state).wait()  # allocates and faults in the staging slot once
        blocked, total, floor = [], [], []
        for step in range(1, self.repeat + 2):
            fresh_steps(tier)  # no earlier step to link unchanged files from: a full write
            if compression is None:
                floor.append(timed(self.copy))
            gc.collect()
            start = time.perf_counter()
            handle = manager.save(step, self.state)
            blocked.append(time.perf_counter() - start)
            handle.wait()
            total.append(time.perf_counter() - start)
            manager.wait()
        if compression is None:
            self.add("blocking (memcpy floor)", "memcpy into preallocated", min(floor))
            self.add("blocking", f"{who} save()", min(blocked))
        else:
            self.notes.append(f"{who}: a step takes {manager._io[0].manifest(step).nbytes / self.nbytes:.1%} "
                              "of the state's bytes")
        self.add("durable save", f"{who} save() to committed", min(total))
        target = like(self.state)

        def restore() -> None:
            manager.restore(into=target)

        def check() -> None:
            assert all(torch.equal(a, b) for a, b in zip(tensors_of(target), self.tensors, strict=True)), who

        self.readers.append((f"{who} restore(into=)", restore, tier))
        self.open.callback(check)

    def restores(self) -> None:
        """Every reader's restore rows and the read limit's, warm and cold, measured in turn (see :func:`in_turn`);
        a cold run follows a drop of every reader's files and the limit's from the page cache."""
        threads = CheckpointOptions().threads
        files = self.raw_files

        def cool() -> None:
            for _, _, path in self.readers:
                drop_cache(path)
            drop_cache(files[0].parent)

        into = destination(files)  # a restore puts every byte in a place of its own, as the limit does
        contenders = (*raw_reads(files, threads, into, ""), *((who, restore) for who, restore, _ in self.readers))
        with self.open:
            for row in in_turn(contenders, self.repeat, cool, timed):
                self.add(*row)
        fresh(files[0].parent)

    def torch_save(self) -> None:
        path = self.root / "torch.pt"

        def save() -> None:
            torch.save(self.state, path)
            fsync_path(path)

        self.add("durable save", "torch.save + fsync", best(save, self.repeat, lambda: path.unlink(True)))
        self.readers.append(("torch.load", lambda: torch.load(path, weights_only=True), path))
        self.open.callback(path.unlink)

    def dcp(self) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        if not dist.is_initialized():
            port = free_port()
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        path = self.root / "dcp"

        def save() -> None:
            dcp.save(self.state, checkpoint_id=str(path))

        self.add("durable save", "dcp.save", best(save, self.repeat, lambda: fresh(path)))
        blocked, total = [], []
        for _ in range(self.repeat):
            fresh(path)
            gc.collect()
            start = time.perf_counter()
            future = dcp.async_save(self.state, checkpoint_id=str(path))
            blocked.append(time.perf_counter() - start)
            future.result()
            total.append(time.perf_counter() - start)
        self.add("blocking", "dcp.async_save", min(blocked))
        self.add("durable save", "dcp.async_save to done", min(total))
        target = like(self.state)
        self.readers.append(("dcp.load (into)", lambda: dcp.load(target, checkpoint_id=str(path)), path))
        self.open.callback(fresh, path)

    def table(self) -> list[str]:
        return rows_table(self.rows, self.nbytes)


IN_TURN_NOTE = ("Rows 'restore warm' and 'restore cold': the median of the rounds, every reader run once a round, in "
                "an order that reverses each round; other rows: the best run.")


def in_turn(contenders: Sequence[tuple[str, Callable[[], Any]]], repeat: int, cool: Callable[[], None],
            timer: Callable[[Callable[[], Any]], float]) -> list[tuple[str, str, float]]:
    """Warm and cold rows (measure, who, median seconds) of ``contenders``, measured in turn: each of ``repeat``
    rounds runs every contender once warm, then once cold, in an order that reverses each round, so that the disk's
    drift hits them alike and none always runs first after the disk was idle. A warm run follows an untimed run of
    the same reads, a cold one ``cool()``, a ``sync`` and half a second for the disk to settle. The median, not the
    best: this disk's cold rate moves by half from one run to the next, and the best of a few runs is whichever
    contender drew the one lucky run. Rows in the order of ``contenders``."""
    times: dict[tuple[str, str], list[float]] = {}
    for round_ in range(repeat):
        for measure, cold in (("restore warm", False), ("restore cold", True)):
            for who, fn in order_of_round(contenders, round_):
                if cold:
                    cool()
                    os.sync()
                    time.sleep(0.5)
                else:
                    fn()
                times.setdefault((measure, who), []).append(timer(fn))
    return [(measure, who, statistics.median(times[(measure, who)])) for who, _ in contenders
            for measure in ("restore warm", "restore cold")]


def raw_reads(files: Sequence[Path], threads: int, into: memoryview, each: str) -> list[tuple[str, Callable[[], Any]]]:
    """The read limit's ways as contenders (see :func:`read_files`): which is fastest depends on the disk, and the
    table takes the fastest as the limit."""
    return [(f"raw read, {threads} threads{each}, {name}", functools.partial(read_files, files, threads, into=into, **way))
            for name, way in READ_WAYS.items()]


def rows_table(measured: list[tuple[str, str, float]], nbytes: int) -> list[str]:
    """The table of rows (measure, who, seconds), each against the raw limit of its measure (the fastest raw row)."""
    floor = {what: min(s for w, _, s in measured if w == what) for what, _, _ in measured}
    raw: dict[str, float] = {}
    for what, who, seconds in measured:
        if who.startswith(("raw", "memcpy")):
            raw[what] = min(seconds, raw.get(what, seconds))
    rows = [["measure", "who", "seconds", "GB/s", "vs raw limit"]]
    for what, who, seconds in measured:
        limit = raw.get(what, raw.get(what.replace("blocking", "blocking (memcpy floor)"), floor[what]))
        rows.append([what, who, f"{seconds:.3f}", f"{nbytes / seconds / 1e9:.2f}", f"{limit / seconds:.2f}x"])
    return markdown_table(rows, left=[0, 1])


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def small_tensors(root: Path, count: int, repeat: int) -> list[str]:
    """Per-tensor cost of many small tensors (best of ``repeat``): trainio, raw files, zarr-python."""
    rng = np.random.default_rng(0)
    state = {f"t{i}": torch.from_numpy(rng.standard_normal(int(rng.integers(64, 4096)), dtype=np.float32))
             for i in range(count)}
    results: list[list[str]] = [["small tensors", "write µs/tensor", "read µs/tensor"]]

    tier = root / "small-trainio"
    fresh(tier)
    with CheckpointManager([Tier(tier, keep_last=1)]) as manager:
        manager.save(0, state).wait()
        steps = iter(range(1, repeat + 1))
        # Each save starts from an empty tier: nothing to link from, every byte written.
        write = best(lambda: manager.save(next(steps), state).wait(), repeat, lambda: fresh_steps(tier))
        target = like(state)
        read = best(lambda: manager.restore(into=target), repeat)
    results.append(["trainio (durable, hashed)", f"{write / count * 1e6:.0f}", f"{read / count * 1e6:.0f}"])
    fresh(tier)

    raw = root / "small-raw"
    fresh(raw)
    raw.mkdir(parents=True)
    arrays = [t.numpy() for t in state.values()]

    def raw_write() -> None:
        for i, a in enumerate(arrays):
            with open(raw / f"t{i}", "wb", buffering=0) as f:
                f.write(memoryview(a).cast("B"))
        os.sync()

    def raw_read() -> None:
        for i, a in enumerate(arrays):
            with open(raw / f"t{i}", "rb", buffering=0) as f:
                f.readinto(memoryview(a).cast("B"))

    w, r = best(raw_write, repeat), best(raw_read, repeat)
    results.append(["raw file per tensor (+1 sync)", f"{w / count * 1e6:.0f}", f"{r / count * 1e6:.0f}"])
    fresh(raw)

    import zarr

    sample = min(count, 300)
    path = root / "small-zarr"
    fresh(path)

    def zarr_write() -> None:
        group = zarr.open_group(path, mode="w")
        for i, a in enumerate(arrays[:sample]):
            group.create_array(f"t{i}", data=a, compressors=None)

    def zarr_read() -> None:
        group = zarr.open_group(path, mode="r")
        for i in range(sample):
            group[f"t{i}"][...]

    w, r = timed(zarr_write), timed(zarr_read)
    results.append([f"zarr-python ({sample} arrays)", f"{w / sample * 1e6:.0f}", f"{r / sample * 1e6:.0f}"])
    fresh(path)
    return markdown_table(results, left=[0])


def loop_slowdown(root: Path, state: dict[str, Any]) -> list[str]:
    """Step time of a training-like loop, idle and while a save flushes in the background."""
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])
    data = torch.randn(64, 512)

    def torch_step() -> None:
        model(data).sum().backward()

    def python_step() -> None:
        total = 0
        for i in range(20000):
            total += i * i

    def one_thread_step() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch_step()
        finally:
            torch.set_num_threads(threads)

    rows = [["loop step", "idle ms", "during flush ms", "slowdown"]]
    tier = root / "slowdown"
    fresh(tier)
    steps = (("torch fwd+bwd, all cores", torch_step), ("torch fwd+bwd, 1 thread", one_thread_step),
             ("pure Python (GIL only)", python_step))
    with CheckpointManager([Tier(tier, keep_last=1)]) as manager:
        manager.save(0, state).wait()
        for name, step in steps:
            for _ in range(5):
                step()
            idle = []
            for _ in range(30):
                idle.append(timed(step))
            busy = []
            for n in range(1, 3):
                handle = manager.save(100 * n + len(rows), state)
                while not handle.done():
                    busy.append(timed(step))
                handle.wait()
            i, b = float(np.median(idle)), float(np.median(busy))
            rows.append([name, f"{i * 1e3:.2f}", f"{b * 1e3:.2f}", f"{(b / i - 1) * 100:+.0f}%"])
    fresh(tier)
    return markdown_table(rows, left=[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--only", choices=["big", "small", "loop"], action="append")
    parser.add_argument("--ranks", type=int, default=0,
                        help="run only the multi-rank table, with this many local gloo ranks")
    parser.add_argument("--nodes", type=int, default=0,
                        help="with --ranks: add node-tier rows, the ranks simulating this many nodes")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    only = set(args.only or ["big", "small", "loop"])
    print("\n".join(machine_lines(machine(["trainio", "torch", "zarr", "numpy"]), str(root))), flush=True)
    out: list[str] = []
    if args.ranks:
        import _ckpt_ranks

        try:
            nbytes = sum(t.numel() * t.element_size() for t in tensors_of(state_of(args.gb)))
            measured = _ckpt_ranks.run(root, args.gb, args.ranks, args.repeat, args.nodes)
        finally:
            if args.dir is None:
                shutil.rmtree(root, ignore_errors=True)
        nodes = f", as {args.nodes} nodes" if args.nodes else ""
        print("\n".join(["", f"{args.ranks} ranks{nodes}, Shard(0) over a 1-D mesh; state {nbytes / 1e9:.2f} GB",
                         *rows_table(measured, nbytes), IN_TURN_NOTE]))
        return
    state = state_of(args.gb)
    try:
        if "big" in only:
            bench = Bench(root, state, args.repeat)
            print(f"state: {len(bench.tensors)} tensors, {bench.nbytes / 1e9:.2f} GB", flush=True)
            for part in (bench.memcpy, bench.raw, bench.trainio, lambda: bench.trainio("zstd:1"), bench.torch_save,
                         bench.dcp, bench.restores):
                part()
            out += ["", f"state: {len(bench.tensors)} tensors, {bench.nbytes / 1e9:.2f} GB", *bench.table(),
                    IN_TURN_NOTE, *bench.notes]
        if "small" in only:
            out += ["", *small_tensors(root, args.small, max(3, args.repeat))]
        if "loop" in only:
            out += ["", *loop_slowdown(root, state)]
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print("\n".join(out))


if __name__ == "__main__":
    main()
