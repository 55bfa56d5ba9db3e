"""ShardCache: budget, eviction orders, pins, download collapsing, restarts and killed processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import xxhash

from trainio.storage import (
    CacheOptions,
    FurthestInFuture,
    IntegrityError,
    LocalStore,
    NotFound,
    S3Store,
    ShardCache,
    Store,
    StoreError,
)

MIB = 1 << 20


def xxh(data: bytes) -> str:
    return str(xxhash.xxh3_128_hexdigest(data))


def fill(store: Store, count: int, size: int = MIB) -> dict[str, bytes]:
    files = {f"shards/shard-{i:05d}.arrow": bytes([i]) * size for i in range(count)}
    for key, data in files.items():
        store.put(key, data)
    return files


@pytest.fixture
def remote(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "remote")


def test_fetch_downloads_once_and_verifies(remote: LocalStore, tmp_path: Path) -> None:
    files = fill(remote, 2)
    cache = ShardCache(remote, tmp_path / "cache", 10 * MIB)
    key, data = next(iter(files.items()))
    path = cache.fetch(key, expected_xxh3=xxh(data))
    assert path.read_bytes() == data
    assert cache.fetch(key, expected_xxh3=xxh(data)) == path
    assert cache.stats() == {"hits": 1, "misses": 1, "downloaded_bytes": MIB, "evictions": 0}
    assert cache.contains(key, expected_xxh3=xxh(data))
    assert cache.used_bytes() == MIB


def test_wrong_digest_is_refused_and_not_cached(remote: LocalStore, tmp_path: Path) -> None:
    fill(remote, 1)
    cache = ShardCache(remote, tmp_path / "cache", 10 * MIB)
    with pytest.raises(IntegrityError) as info:
        cache.fetch("shards/shard-00000.arrow", expected_xxh3="f" * 32)
    assert info.value.key == "shards/shard-00000.arrow"
    assert cache.used_bytes() == 0
    assert not cache.contains("shards/shard-00000.arrow", expected_xxh3="f" * 32)
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_missing_key(remote: LocalStore, tmp_path: Path) -> None:
    cache = ShardCache(remote, tmp_path / "cache", MIB)
    with pytest.raises(NotFound):
        cache.fetch("nope")


def test_byte_limit_holds_under_eviction(remote: LocalStore, tmp_path: Path) -> None:
    files = fill(remote, 10)
    cache = ShardCache(remote, tmp_path / "cache", int(3.5 * MIB))
    for _ in range(2):
        for key, data in files.items():
            with cache.pinned(key, expected_xxh3=xxh(data)) as path:
                assert path.read_bytes() == data
            assert cache.used_bytes() <= cache.max_bytes
    stats = cache.stats()
    assert stats["misses"] == 20 and stats["evictions"] == 17


def test_least_recently_used_goes_first(remote: LocalStore, tmp_path: Path) -> None:
    keys = list(fill(remote, 4))
    cache = ShardCache(remote, tmp_path / "cache", 3 * MIB)
    for key in keys[:3]:
        cache.fetch(key)
        time.sleep(0.01)
    cache.fetch(keys[0])  # now keys[1] is the least recently used
    cache.fetch(keys[3])
    assert [cache.contains(k) for k in keys] == [True, False, True, True]


def test_furthest_in_future_goes_first(remote: LocalStore, tmp_path: Path) -> None:
    keys = list(fill(remote, 4))
    policy = FurthestInFuture()
    cache = ShardCache(remote, tmp_path / "cache", 3 * MIB, policy=policy)
    for key in keys[:3]:
        cache.fetch(key)
    policy.set_upcoming([keys[3], keys[0], keys[2], keys[1], keys[0]])
    cache.fetch(keys[3])  # keys[1] is needed furthest ahead, although keys[0] is least recently used
    assert [cache.contains(k) for k in keys] == [True, False, True, True]
    policy.set_upcoming([keys[3], keys[2]])
    cache.fetch(keys[1])  # keys[0] is not needed again at all
    assert [cache.contains(k) for k in keys] == [False, True, True, True]


def test_pinned_file_is_not_evicted(remote: LocalStore, tmp_path: Path) -> None:
    keys = list(fill(remote, 5))
    cache = ShardCache(remote, tmp_path / "cache", 2 * MIB)
    with cache.pinned(keys[0]) as pinned_path:
        for key in keys[1:]:
            cache.fetch(key)
        assert pinned_path.exists()
        assert pinned_path.read_bytes() == bytes([0]) * MIB
    cache.fetch(keys[1])
    cache.fetch(keys[2])
    assert not cache.contains(keys[0])


def test_full_of_pins_fails_with_the_figures(remote: LocalStore, tmp_path: Path) -> None:
    keys = list(fill(remote, 3))
    cache = ShardCache(remote, tmp_path / "cache", 2 * MIB, options=CacheOptions(full_wait_s=0.2))
    with cache.pinned(keys[0]), cache.pinned(keys[1]):
        with pytest.raises(StoreError, match=r"cannot cache 1048576 bytes: 2097152 of 2097152 bytes .* pinned"):
            cache.fetch(keys[2])
    assert cache.fetch(keys[2]).exists()


def test_a_file_bigger_than_the_budget_is_refused(remote: LocalStore, tmp_path: Path) -> None:
    remote.put("huge", b"x" * (2 * MIB))
    cache = ShardCache(remote, tmp_path / "cache", MIB)
    with pytest.raises(StoreError, match="more than the cache's whole budget"):
        cache.fetch("huge")


def test_concurrent_fetches_of_one_key_download_once(remote: LocalStore, tmp_path: Path) -> None:
    fill(remote, 1, 8 * MIB)
    cache = ShardCache(remote, tmp_path / "cache", 64 * MIB)
    barrier = threading.Barrier(8)
    paths: list[Path] = []

    def fetch() -> None:
        barrier.wait()
        paths.append(cache.fetch("shards/shard-00000.arrow"))

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 7


_FETCHER = textwrap.dedent("""
    import sys, time
    from trainio.storage import LocalStore, ShardCache
    remote, cache_dir, start_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
    cache = ShardCache(LocalStore(remote), cache_dir, 64 << 20)
    time.sleep(max(0.0, start_at - time.time()))
    with cache.pinned("shards/shard-00000.arrow") as path:
        assert path.stat().st_size == 16 << 20
    print(cache.stats()["misses"])
""")


@pytest.mark.slow
def test_processes_sharing_a_directory_download_once(remote: LocalStore, tmp_path: Path) -> None:
    fill(remote, 1, 16 * MIB)
    start_at = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", _FETCHER, str(remote.root), str(tmp_path / "cache"),
                               str(start_at)], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    misses = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(misses) == [0, 0, 0, 1]


def test_contents_survive_a_restart(remote: LocalStore, tmp_path: Path) -> None:
    files = fill(remote, 2)
    first = ShardCache(remote, tmp_path / "cache", 10 * MIB)
    for key, data in files.items():
        first.fetch(key, expected_xxh3=xxh(data))
    second = ShardCache(remote, tmp_path / "cache", 10 * MIB)
    for key, data in files.items():
        assert second.fetch(key, expected_xxh3=xxh(data)).read_bytes() == data
    assert second.stats()["misses"] == 0


_KILLED_DOWNLOADER = textwrap.dedent("""
    import sys, time
    from trainio.storage import LocalStore, ShardCache

    class SlowStore(LocalStore):
        def _read_stream(self, key, sink, size):
            sink.write(b"G" * (size // 2))
            print("halfway", flush=True)
            time.sleep(60)

    cache = ShardCache(SlowStore(sys.argv[1]), sys.argv[2], 64 << 20)
    cache.fetch("shards/shard-00000.arrow")
""")


def test_a_killed_downloader_leaves_nothing_that_blocks_or_lies(remote: LocalStore, tmp_path: Path) -> None:
    files = fill(remote, 1, 4 * MIB)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_DOWNLOADER, str(remote.root), str(tmp_path / "cache")],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"halfway"
        assert len(list((tmp_path / "cache" / "tmp").iterdir())) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    cache = ShardCache(remote, tmp_path / "cache", 64 * MIB, options=CacheOptions(full_wait_s=0))
    key, data = next(iter(files.items()))
    started = time.monotonic()
    assert cache.fetch(key, expected_xxh3=xxh(data)).read_bytes() == data
    assert time.monotonic() - started < 5, "a dead process's lock made the next fetch wait"
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert cache.used_bytes() == 4 * MIB


def test_clear_keeps_pinned_files(remote: LocalStore, tmp_path: Path) -> None:
    keys = list(fill(remote, 3))
    cache = ShardCache(remote, tmp_path / "cache", 10 * MIB)
    for key in keys:
        cache.fetch(key)
    with cache.pinned(keys[0]):
        assert cache.clear() == 2
    assert cache.contains(keys[0]) and not cache.contains(keys[1])


def test_remote_s3_store(s3_store: S3Store, tmp_path: Path) -> None:
    data = os.urandom(11 * MIB)
    digest = s3_store.put("shards/big.arrow", data)
    cache = ShardCache(s3_store, tmp_path / "cache", 32 * MIB)
    with cache.pinned("shards/big.arrow", expected_xxh3=digest) as path:
        assert path.read_bytes() == data
    assert cache.stats()["downloaded_bytes"] == 11 * MIB


_REUSER = textwrap.dedent("""
    import sys
    from trainio.storage import LocalStore, ShardCache

    cache = ShardCache(LocalStore(sys.argv[1]), sys.argv[2], 64 << 20)
    with cache.pinned("shards/shard-00000.arrow", expected_xxh3=sys.argv[3]) as path:
        sys.stdout.buffer.write(path.read_bytes())
    print(cache.stats(), file=sys.stderr)
""")


def test_a_cached_file_damaged_after_its_download_is_found_by_the_next_process(remote: LocalStore,
                                                                                tmp_path: Path) -> None:
    """Downloads are not fsynced: a file damaged later (by a power loss before write-back, or on disk) is checked
    by each process before its first use, and downloaded again rather than read."""
    [(key, data)] = fill(remote, 1, 3 * MIB).items()
    digest = xxh(data)
    cache = ShardCache(remote, tmp_path / "cache", 64 * MIB)
    path = cache.fetch(key, expected_xxh3=digest)
    assert cache.fetch(key, expected_xxh3=digest) == path and cache.stats()["misses"] == 1

    def reuse() -> tuple[bytes, str]:
        run = subprocess.run([sys.executable, "-c", _REUSER, str(remote.root), str(tmp_path / "cache"), digest],
                             capture_output=True, check=True)
        return run.stdout, run.stderr.decode()

    assert reuse() == (data, "{'hits': 1, 'misses': 0, 'downloaded_bytes': 0, 'evictions': 0}\n")
    with open(path, "r+b") as f:
        f.seek(2 * MIB + 3)
        f.write(b"\x55")
    got, log_and_stats = reuse()
    assert got == data
    assert "no longer matches its digest" in log_and_stats and "'misses': 1" in log_and_stats
    assert path.read_bytes() == data  # replaced by the good download


def test_caches_of_different_stores_share_a_directory(tmp_path: Path) -> None:
    a, b = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    a.put("k", b"from a" * 1000)
    b.put("k", b"from b" * 1000)
    cache_a = ShardCache(a, tmp_path / "cache", 13_000)
    cache_b = ShardCache(b, tmp_path / "cache", 13_000)
    assert cache_a.fetch("k").read_bytes() != cache_b.fetch("k").read_bytes()
    assert cache_a.used_bytes() == cache_b.used_bytes() == 12_000
    b.put("k2", b"x" * 5000)
    cache_b.fetch("k2")  # the shared budget forces the least recently used file out, whoever owns it
    assert cache_b.used_bytes() <= 13_000
    assert not cache_a.contains("k")
