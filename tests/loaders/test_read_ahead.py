"""How far ahead of its readers a local dataset is read: the shard checker's bound in bytes, kept whatever the
shard size, and never at the cost of a check."""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.loaders import Dataset, DatasetWriter, Loader, StreamingDataset
from trainio.loaders._read import cold_hash, shard_check, verified
from trainio.loaders._read.dataset import map_file
from trainio.storage import Hasher, IntegrityError, digest
from trainio.tools._bench_limits import drop_from_page_cache

from ._damage import drop_row_digests, flip_bit

pytestmark = pytest.mark.timeout(120)  # a checker paused at its bound must never hang a reader or a close

ROWS = 48_000
ROW_INTS = 12


def write(path: Path) -> Path:
    """About 3 MB in shards of about 240 KB (4,000 rows: half of what a reader plans at a time in order)."""
    with DatasetWriter(path, batch_rows=1000, shard_bytes=240_000) as writer:
        writer.write_batch({"id": np.arange(ROWS, dtype=np.int64),
                            "payload": list(np.arange(ROWS * ROW_INTS, dtype=np.int32).reshape(ROWS, -1))})
    assert len(Dataset(path).shards) >= 10
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The dataset of :func:`write`, its shards checked whole (no row digests): what the checker's threads read
    ahead."""
    return drop_row_digests(write(tmp_path / "ds"))


@pytest.fixture(autouse=True)
def nothing_checked_yet() -> Iterator[None]:
    """Every test starts as a new process would: no shard known good."""
    shard_check.forget_verified()
    yield
    shard_check.forget_verified()


def reaches(read: Callable[[], int], value: int, seconds: float = 30.0) -> int:
    """``read()`` once it equals ``value`` (or once it is past it, or at the deadline), and then a while later."""
    deadline = time.monotonic() + seconds
    while read() < value and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time enough for a thread that would not stop to go on
    return read()


def test_the_threads_stop_at_the_bound_in_the_middle_of_a_shard(root: Path) -> None:
    dataset = Dataset(root)
    sizes = [info.bytes for info in dataset.shards]
    bound = sizes[0] + sizes[1] + sizes[2] // 2  # two shards and half of the third
    checker = dataset.checker()
    checker.read_ahead = bound
    checker.expect(range(len(dataset.shards)))
    assert reaches(lambda: checker.ahead_peak, bound) == bound
    checker.plan([0])  # a reader starts on shard 0: the bound moves one shard on, and the third is finished
    assert reaches(lambda: sum(checker._hashed.values()), bound + sizes[0]) == bound + sizes[0]
    assert checker.ahead_peak == bound
    assert verified.known(dataset.mapped(2).identity, dataset.shards[2].xxh3_128)
    assert not verified.known(dataset.mapped(4).identity, dataset.shards[4].xxh3_128)
    checker.close()


def test_a_reader_waiting_for_a_shard_paused_at_the_bound_gets_it_checked_whole(root: Path) -> None:
    dataset = Dataset(root)
    checker = dataset.checker()
    checker.read_ahead = dataset.shards[0].bytes // 2
    checker.expect(range(len(dataset.shards)))
    assert reaches(lambda: checker.ahead_peak, checker.read_ahead) == checker.read_ahead
    assert checker.wait(0).buffer.size == dataset.shards[0].bytes  # the paused thread goes on for the reader
    assert checker.wait(7).buffer.size == dataset.shards[7].bytes  # nobody's: the reader hashes it itself
    checker.close()


def test_a_checker_paused_at_the_bound_closes_at_once(root: Path) -> None:
    dataset = Dataset(root)
    checker = dataset.checker()
    checker.read_ahead = 1000
    checker.expect(range(len(dataset.shards)))
    assert reaches(lambda: checker.ahead_peak, 1000) == 1000
    closer = threading.Thread(target=checker.close)
    closer.start()
    closer.join(10)
    assert not closer.is_alive()


def test_no_thread_stays_behind_at_the_bound(root: Path) -> None:
    ds = StreamingDataset(root, read_ahead_bytes=Dataset(root).shards[0].bytes // 2)
    checker = ds.dataset.checker()
    assert reaches(lambda: checker.ahead_peak, checker.read_ahead) == checker.read_ahead
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in checker._threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in checker._threads)  # the paused hash is kept, not a thread waiting on it
    assert len(list(ds)) == ROWS  # and goes on from where it paused


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_loader_reads_ahead_within_the_bound(root: Path, shuffle: bool) -> None:
    bound = 3 * Dataset(root).shards[0].bytes // 2
    ds = StreamingDataset(root, shuffle=shuffle, shuffle_window=4000, read_ahead_bytes=bound)
    seen = []
    for batch in Loader(ds, 500):
        seen.extend(batch["id"].tolist())
        time.sleep(0.01)  # a slow trainer: the threads get as far ahead as they may
    assert sorted(seen) == list(range(ROWS))
    peak = ds.dataset.checker().ahead_peak
    assert bound // 2 < peak <= bound


def test_the_trainer_process_reads_ahead_of_transform_workers(root: Path) -> None:
    dataset = Dataset(root)
    ds = StreamingDataset(root, shuffle=False, batch_size=500, read_ahead_bytes=dataset.shards[0].bytes)
    loader = Loader(ds, 500, workers=2)
    try:
        assert sum(len(batch["id"]) for batch in loader) == ROWS
    finally:
        loader.close()
    checker = ds.dataset.checker()  # this process's: the workers check every shard again themselves
    assert all(verified.known(ds.dataset.mapped(s).identity, info.xxh3_128) for s, info in enumerate(dataset.shards))
    assert 0 < checker.ahead_peak <= checker.read_ahead


@pytest.mark.parametrize("read", ["loader", "samples"])
def test_a_dropped_dataset_and_its_maps_go_at_once_without_the_garbage_collector(root: Path, read: str) -> None:
    ds = StreamingDataset(root, shuffle=False)
    if read == "loader":
        assert sum(len(batch["id"]) for batch in Loader(ds, 500)) == ROWS
    else:
        assert sum(1 for _ in ds) == ROWS
    dataset = weakref.ref(ds.dataset)
    checker = ds.dataset.checker()
    gc.disable()
    try:
        del ds
        assert dataset() is None  # no cycle between it and its checker keeps it (and every shard's map) alive
    finally:
        gc.enable()
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in checker._threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in checker._threads)  # and its checker's threads stopped with it


def test_the_bound_applies_per_epoch_and_to_the_per_sample_path(root: Path) -> None:
    bound = Dataset(root).shards[0].bytes
    ds = StreamingDataset(root, shuffle=False, read_ahead_bytes=bound)
    for epoch in range(2):
        ds.set_epoch(epoch)
        shard_check.forget_verified()
        count = 0
        for _ in ds:
            count += 1
            if count % 2000 == 0:
                time.sleep(0.01)
        assert count == ROWS
    assert 0 < ds.dataset.checker().ahead_peak <= bound


def test_without_read_ahead_every_shard_is_still_checked_before_use(root: Path) -> None:
    dataset = Dataset(root)
    flip_bit(root / dataset.shards[7].path, dataset.shards[7].bytes // 2)
    first_damaged = dataset.index.shard_offsets[7]
    delivered: list[int] = []
    with pytest.raises(IntegrityError, match=dataset.shards[7].path):
        for sample in StreamingDataset(root, shuffle=False, read_ahead_bytes=0):
            delivered.append(int(sample["id"]))
    assert delivered == list(range(first_damaged))
    assert StreamingDataset(root, read_ahead_bytes=0).dataset.checker().ahead_peak == 0


def test_a_bound_that_is_not_a_size_is_refused(root: Path) -> None:
    with pytest.raises(ValueError, match="not a size"):
        StreamingDataset(root, read_ahead_bytes="lots")
    with pytest.raises(ValueError, match="must be positive"):
        StreamingDataset(root, read_ahead_bytes=-1)


# -- cold shards: hashed through reads of the file --------------------------------------------------------------


def evicted(path: Path) -> bool:
    """Drop ``path`` from the page cache; whether it left (a file system may keep it: then the test cannot tell)."""
    drop_from_page_cache([path])
    mapped = map_file(path)
    gone = not cold_hash.resident(mapped, 0, mapped.size)
    assert not gone or cold_hash.resident_share(mapped) < 1.0
    return gone


def test_residency_and_reads_give_the_mapping_s_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(5).integers(0, 256, size=3 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    mapped = map_file(path)
    _ = bytes(memoryview(mapped))  # every page touched
    assert cold_hash.resident(mapped, 0, mapped.size) and cold_hash.resident(mapped, 5, 7)
    assert cold_hash.resident_share(mapped) == 1.0
    fd = os.open(path, os.O_RDONLY)
    try:
        hasher = Hasher()
        assert cold_hash.hash_by_reads(fd, hasher, 1000, len(data) - 3, lambda: False)
        assert hasher.hexdigest() == digest(data[1000:-3])
        assert not cold_hash.hash_by_reads(fd, Hasher(), 0, len(data), lambda: True)
        with pytest.raises(OSError, match="ended"):
            cold_hash.hash_by_reads(fd, Hasher(), 0, len(data) + 10, lambda: False)
    finally:
        os.close(fd)


def test_a_cold_shard_is_hashed_through_reads_and_a_flipped_bit_still_stops_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = Dataset(root)
    shard = dataset.shards[3]
    flip_bit(root / shard.path, shard.bytes // 3)
    if not evicted(root / shard.path):
        pytest.skip("this file system kept the shard's pages in memory")
    reads: list[int] = []
    real = shard_check.hash_by_reads
    monkeypatch.setattr(shard_check, "hash_by_reads", lambda fd, h, a, b, s: reads.append(b - a) or real(fd, h, a, b, s))
    with pytest.raises(IntegrityError, match=shard.path):
        dataset.checker().wait(3)
    assert sum(reads) == shard.bytes  # the whole shard went through reads, not page faults
    flip_bit(root / shard.path, shard.bytes // 3)  # repaired: the same bytes as written
    if not evicted(root / shard.path):
        pytest.skip("this file system kept the shard's pages in memory")
    again = Dataset(root)  # a checker lives as long as its dataset
    assert again.checker().wait(3).buffer.size == shard.bytes


def test_shards_with_row_digests_in_memory_are_left_to_their_readers(tmp_path: Path) -> None:
    path = write(tmp_path / "ds")
    ds = StreamingDataset(path, shuffle=False)  # announces the epoch: the threads look at every shard
    checker = ds.dataset.checker()
    time.sleep(0.5)
    assert checker.ahead_peak == 0 and not any(verified.known(ds.dataset.mapped(s).identity, info.xxh3_128)
                                               for s, info in enumerate(ds.dataset.shards))
    ids = np.concatenate([batch["id"].numpy() for batch in Loader(ds, 500)])
    assert np.array_equal(np.sort(ids), np.arange(ROWS))  # every row checked as it was copied
    assert checker.wait(2).buffer.size == ds.dataset.shards[2].bytes  # a reader that asks gets it hashed whole
    assert verified.known(ds.dataset.mapped(2).identity, ds.dataset.shards[2].xxh3_128)


def test_shards_with_row_digests_in_memory_need_no_thread(tmp_path: Path) -> None:
    ds = StreamingDataset(write(tmp_path / "ds"), shuffle=False)  # just written: in memory
    checker = ds.dataset.checker()
    checker.leave_rows_to_readers()  # as a Loader does: every shard looked at, in this thread, at once
    assert not checker._threads and checker._left == set(range(len(ds.dataset.shards)))
    assert not ds.dataset._maps  # through their files, not mapped
    ids = np.concatenate([batch["id"].numpy() for batch in Loader(ds, 500)])
    assert np.array_equal(ids, np.arange(ROWS))


@pytest.mark.parametrize("read_ahead", [True, False])
def test_a_cold_shard_with_row_digests_is_read_ahead_unless_told_not_to_but_never_hashed(tmp_path: Path,
                                                                                          read_ahead: bool) -> None:
    path = write(tmp_path / "ds")
    dataset = Dataset(path)
    if not all(evicted(path / info.path) for info in dataset.shards[:3]):
        pytest.skip("this file system kept the shards' pages in memory")
    ds = StreamingDataset(path, shuffle=False)
    checker = ds.dataset.checker()
    checker.leave_rows_to_readers(read_ahead)  # as a Loader does (its workers: not read ahead): rows checked as copied
    first = ds.dataset.shards[0]
    mapped = ds.dataset.mapped(0).buffer
    all_done(checker)
    if read_ahead:
        assert cold_hash.resident_share(mapped) >= 0.9  # read into the page cache ahead of its readers
        assert 0 < checker.ahead_peak <= checker.read_ahead
    else:
        assert cold_hash.resident_share(mapped) < 0.5 and checker.ahead_peak == 0  # left to the workers' page faults
    assert set(ds.dataset._maps) == {0}  # the threads opened the shards but mapped none (only this test did)
    assert not verified.known(ds.dataset.mapped(0).identity, first.xxh3_128)  # and not hashed: its rows are checked as read
    if huge_pages_possible():  # what faults read before the read-ahead gets there comes in huge folios (a Loader's)
        assert marked_huge(checker.mapping(1).buffer) == read_ahead


def all_done(checker: shard_check.ShardChecker) -> None:
    """Once the checker's threads have ended (nothing left for them), or fail after 10 s."""
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in checker._threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in checker._threads)


def test_a_shard_replaced_while_its_read_ahead_is_paused_is_left_to_its_readers(tmp_path: Path) -> None:
    path = write(tmp_path / "ds")
    dataset = Dataset(path)
    sizes = [info.bytes for info in dataset.shards]
    if not all(evicted(path / info.path) for info in dataset.shards[:3]):
        pytest.skip("this file system kept the shards' pages in memory")
    ds = StreamingDataset(path, shuffle=False)
    checker = ds.dataset.checker()
    checker.read_ahead = sizes[0] + sizes[1] // 2  # the read-ahead pauses in the middle of shard 1
    checker.leave_rows_to_readers()
    assert reaches(lambda: checker.ahead_peak, checker.read_ahead) == checker.read_ahead
    shard = path / dataset.shards[1].path
    shard.with_suffix(".new").write_bytes(shard.read_bytes())
    os.replace(shard.with_suffix(".new"), shard)  # the same bytes in another file: what was read ahead is not it
    checker.plan([0])
    all_done(checker)
    assert 1 in checker._left and 1 not in checker._results and 1 not in checker._paused
    ids = np.concatenate([batch["id"].numpy() for batch in Loader(ds, 500)])  # its readers map the new file
    assert np.array_equal(ids, np.arange(ROWS))


def huge_pages_possible() -> bool:
    """Whether this system can be asked for transparent huge pages."""
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def marked_huge(buffer: Any) -> bool:
    """Whether the mapping holding ``buffer`` is marked for huge pages (``hg`` in /proc/self/smaps)."""
    region = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and ":" not in head:
            low, high = (int(x, 16) for x in head.split("-"))
            region = low <= buffer.address < high
        elif region and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    raise AssertionError("no mapping holds the buffer")


def cold_blob(path: Path, size: int) -> Path:
    """A file of ``size`` random bytes at ``path``, out of the page cache (the test is skipped where it stays in)."""
    path.write_bytes(np.random.default_rng(size).integers(0, 256, size=size, dtype=np.uint8).tobytes())
    if not evicted(path):
        pytest.skip("this file system keeps the file in memory whatever it is told")
    return path


def test_reads_ahead_fill_the_page_cache_and_stop_at_the_end_of_the_file(tmp_path: Path) -> None:
    path = cold_blob(tmp_path / "blob", 6 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        cold_hash.fetch_by_reads(fd, 0, 8 << 20)  # past the end: what there is
    finally:
        os.close(fd)
    cold_hash.fetch_by_reads(fd, 0, 1 << 20)  # a descriptor that no longer reads: nothing, as the advice it replaces
    assert cold_hash.resident_share(map_file(path)) == 1.0
    mapped = map_file(path)
    cold_hash.prefer_huge_pages(mapped)
    assert marked_huge(mapped) == huge_pages_possible()


def test_a_sampled_residency_estimate_is_close_to_the_count_of_every_page(tmp_path: Path) -> None:
    path = cold_blob(tmp_path / "blob", 32 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        # No read-ahead: pages the kernel read ahead could still be arriving between the two counts below (a disk
        # with 8 MiB of read-ahead turned 12 MiB read into 24 MiB in memory between them).
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, 12 << 20, 0)  # the first 12 of 32 MiB read back into memory
    finally:
        os.close(fd)
    mapped = map_file(path)
    exact = cold_hash.resident_share(mapped)
    assert 0.3 < exact < 0.95
    assert abs(cold_hash.resident_share(mapped, windows=16) - exact) < 0.1
    assert cold_hash.resident_share(mapped, windows=1000) == exact  # more windows than fit: every page
    fd = os.open(path, os.O_RDONLY)
    try:
        sampled = cold_hash.cached_share(fd, path.stat().st_size, windows=16)  # the page cache's own count, where kept
        counted = cold_hash.cached_share(fd, path.stat().st_size)
    finally:
        os.close(fd)
    assert counted is None or counted == pytest.approx(exact, abs=0.01)
    assert sampled is None or abs(sampled - exact) < 0.1


def test_a_system_without_cachestat_falls_back_to_the_mapping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel before 6.5 (ENOSYS), or a sandbox refusing the call (EPERM): no count from the file; the checker's
    residency is then estimated from the mapping, and the call is not tried again."""
    path = tmp_path / "blob"
    path.write_bytes(bytes(1 << 20))
    calls: list[int] = []

    def refused(*args: object) -> int:
        calls.append(1)
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(cold_hash, "_syscall", refused)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert [cold_hash.cached_share(fd, 1 << 20) for _ in range(2)] == [None, None]
    finally:
        os.close(fd)
    assert calls == [1]
    ds = StreamingDataset(write(tmp_path / "ds"), shuffle=False)  # just written: in memory
    checker = ds.dataset.checker()
    checker.leave_rows_to_readers()
    all_done(checker)
    assert checker.ahead_peak == 0 and len(checker._left) == len(ds.dataset.shards)  # found in memory: not read
    assert len(ds.dataset._maps) == len(ds.dataset.shards)  # from their mappings' pages

