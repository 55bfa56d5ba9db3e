"""What ``trainio bench`` compares trainio with: this machine's limits, measured in turn with the figures they bound.

A limit is the least work that any implementation of a step must do on the
same bytes, done with the same parallelism as trainio: reading the files with
as many threads, copying the tensors once, writing and fsyncing the bytes.
:func:`interleaved` runs a figure and its limit in turn, several times, so
that the machine's moods (other processes, write-back, frequency) fall on
both alike, and keeps the figure's median and the limit's fastest run.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainio.storage import start_writeback, sync_files

_READ_BLOCK = 8 << 20
_WHOLE_FILE_READ = 256 << 10  # the fastest piece of several tried on this VM (cold: 0.48 s against 0.51 at 1 MiB)


def interleaved(figure: Callable[[], float], limit: Callable[[], float], rounds: int) -> tuple[float, float]:
    """(median seconds of ``figure``, fewest of ``limit``) over ``rounds`` runs of each, run in turn: A, B, A, B ...

    The figure is what a run typically takes; the limit is the best the
    machine did the least work in, in the same stretch of time. Each
    callable does its own untimed preparation and returns the seconds of
    its timed part. Before each run the file systems finish what the last
    one left them (write-back, the blocks of deleted files), untimed, so
    that no run pays for another's.
    """
    figures, limits = [], []
    for _ in range(max(1, rounds)):
        os.sync()
        figures.append(figure())
        os.sync()
        limits.append(limit())
    return statistics.median(figures), min(limits)


def drop_from_page_cache(files: Sequence[Path]) -> None:
    """Evict ``files``' pages from the page cache (pages still mapped stay: maps left for the collector go first).
    A file gone meanwhile is passed over (a tier's lease is renewed through a temp file beside its steps)."""
    gc.collect()
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_page_cache(files: Sequence[Path]) -> None:
    """Read ``files`` once, so that they are in the page cache."""
    read_files(files, threads=1)


def read_files(files: Sequence[Path], threads: int, *, advise: bool = True, into: memoryview | None = None,
               whole_files: bool = False) -> float:
    """Seconds for ``threads`` threads to read every byte of ``files``.

    With ``advise``, the kernel is told at once that every file will be read
    (``WILLNEED``), so what is not in the page cache is read ahead as fast as
    the device takes requests. The threads take 8 MiB blocks in turn, or with
    ``whole_files`` each takes a whole file and reads it from start to end in
    256 KiB reads, as a restore reads its files (the kernel's read-ahead then
    follows each file). The bytes go into one buffer per thread, which stays
    in the CPU's cache (a reader that uses each block and reuses its memory,
    as the Loader's staging does), or with ``into`` (at least as big as the
    files, touched before) each to a place of its own there, as a restore
    must put them (:func:`destination`). Which way is fastest depends on the
    device: a limit takes the fastest of them.
    """
    started = time.perf_counter()
    for path in files if advise else ():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
    block = _WHOLE_FILE_READ if whole_files else _READ_BLOCK
    return time.perf_counter() - started + _read_blocks(files, threads, into, block, whole_files)


READ_WAYS: dict[str, dict[str, bool]] = {"all files advised": {"advise": True, "whole_files": False},
                                          "whole files in turn": {"advise": False, "whole_files": True}}
"""The ways :func:`read_files` reads, by name (its keyword arguments): which is fastest depends on the device."""


def fastest_warm_read(files: Sequence[Path], threads: int, into: memoryview) -> float:
    """The fastest of the :data:`READ_WAYS` of reading ``files`` into ``into``, run one after the other: for files in
    the page cache (a cold limit needs them dropped before each way)."""
    return min(read_files(files, threads, into=into, **way) for way in READ_WAYS.values())


def destination(files: Sequence[Path]) -> memoryview:
    """Memory for every byte of ``files``, touched now (a restore's target tensors already exist)."""
    return np.ones(sum(path.stat().st_size for path in files), np.uint8).data  # written: every page touched


def _read_blocks(files: Sequence[Path], threads: int, into: memoryview | None, block: int, whole_files: bool) -> float:
    """Seconds for ``threads`` threads to read ``files``: each task a block of ``block`` bytes, or a whole file read
    in blocks of ``block`` bytes."""
    tasks: list[tuple[Path, int, int, int]] = []  # (file, offset, bytes, place in ``into``)
    at = 0
    for path in files:
        size = path.stat().st_size
        if whole_files:
            tasks.append((path, 0, size, at))
        else:
            tasks += [(path, offset, min(block, size - offset), at + offset) for offset in range(0, size, block)]
        at += size
    if into is not None and into.nbytes < at:
        raise ValueError(f"into holds {into.nbytes} bytes; the files hold {at}")
    cursor = iter(range(len(tasks)))
    lock = threading.Lock()

    def reader() -> None:
        buffer = memoryview(bytearray(block))
        handles: dict[Path, int] = {}
        try:
            while True:
                with lock:
                    index = next(cursor, None)
                if index is None:
                    return
                path, offset, nbytes, place = tasks[index]
                fd = handles.get(path)
                if fd is None:
                    fd = handles[path] = os.open(path, os.O_RDONLY)
                for start in range(0, nbytes, block):
                    n = min(block, nbytes - start)
                    end = place + start + n
                    os.preadv(fd, [buffer[:n] if into is None else into[end - n:end]], offset + start)
        finally:
            for fd in handles.values():
                os.close(fd)

    return _timed_threads(reader, threads)


class DurableWrite:
    """A limit: ``threads`` threads write as many bytes as ``like`` holds, and bytes like them (a sample of
    each: a disk under a compressing host writes some data faster), into new files of at most
    ``file_bytes`` in ``directory``, and make them durable.

    Calls take turns between three ways to make them durable, each the
    cheapest somewhere: each file fsynced as soon as it is written; each
    file's write-back started as soon as it is written and all of them made
    durable together after the last (:func:`trainio.storage.sync_files`: as
    trainio's writers do); and one ``sync`` after all. With
    :func:`interleaved` keeping the fastest run, the limit is the best of
    them. Each call writes the files anew and deletes them afterwards,
    untimed, waiting for the file system to finish with the deleted blocks
    (this VM's ext4 discards them at the next journal commit), so no run
    pays for one before it.
    """

    WAYS = ("each", "started", "one")
    """The ways to make the files durable, one a call in this order (so ``2 * len(WAYS)`` calls try each twice)."""

    def __init__(self, directory: Path, like: Sequence[memoryview], threads: int = 1,
                 file_bytes: int = 1 << 62) -> None:
        nbytes = sum(view.nbytes for view in like)
        self._block = sample_of(like, min(max(nbytes, 1), 64 << 20))
        self._sizes = [min(file_bytes, nbytes - start) for start in range(0, max(nbytes, 1), file_bytes)]
        self._directory = directory / "durable-write-limit"  # its own: made durable as a whole, as a step's is
        self._paths = [self._directory / f"limit-{i}.bin" for i in range(len(self._sizes))]
        self._threads = threads
        self._calls = 0

    def __call__(self) -> float:
        """Seconds to write the bytes into new files and make them durable."""
        way = self.WAYS[self._calls % len(self.WAYS)]
        self._calls += 1
        cursor = iter(range(len(self._sizes)))
        lock = threading.Lock()

        def writer() -> None:
            while True:
                with lock:
                    index = next(cursor, None)
                if index is None:
                    return
                fd = os.open(self._paths[index], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    done, size = 0, self._sizes[index]
                    while done < size:
                        done += os.pwrite(fd, memoryview(self._block)[:min(size - done, len(self._block))], done)
                    if way == "each":
                        os.fsync(fd)
                    elif way == "started":
                        start_writeback(fd)
                finally:
                    os.close(fd)

        self._directory.mkdir(exist_ok=True)
        try:
            started = time.perf_counter()
            _timed_threads(writer, self._threads)
            if way == "started":
                sync_files(str(self._directory), [str(path) for path in self._paths])
            elif way == "one":
                os.sync()
            return time.perf_counter() - started
        finally:
            for path in self._paths:
                path.unlink(missing_ok=True)
            self._directory.rmdir()
            os.sync()


def sample_of(buffers: Sequence[memoryview], size: int) -> bytes:
    """About ``size`` bytes made of a prefix of each of ``buffers``, each in proportion to its length."""
    total = max(1, sum(b.nbytes for b in buffers))
    parts = [bytes(b.cast("B")[:max(1, b.nbytes * size // total)]) for b in buffers if b.nbytes]
    return b"".join(parts)[:size] or b"\0"


def _timed_threads(work: Callable[[], None], threads: int) -> float:
    """Seconds for ``threads`` threads each running ``work`` to all finish; the first failure is raised."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)

    workers = [threading.Thread(target=run, name=f"trainio-bench-{i}") for i in range(max(1, threads))]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    if failures:
        raise failures[0]
    return seconds


def memcpy(tensors: list[Any]) -> Callable[[], float]:
    """A limit that copies ``tensors`` into buffers allocated and touched once, now: the floor of a snapshot."""
    import torch

    copies = [torch.zeros_like(t) for t in tensors]

    def copy() -> float:
        started = time.perf_counter()
        for target, source in zip(copies, tensors, strict=True):
            target.copy_(source)
        return time.perf_counter() - started

    return copy
