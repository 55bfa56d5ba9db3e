"""The behaviour every trainio Store must have, written once and subclassed per backend.

A backend's test module subclasses :class:`StoreContract`, provides a ``store``
fixture and the out-of-band helpers ``raw_put`` / ``raw_get`` / ``raw_exists``
that touch the backend's bytes without going through the store, so the tests
can check effects behind the store's back.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import pytest
import xxhash

from trainio.storage import (
    AlreadyExists,
    IntegrityError,
    InvalidKey,
    NotFound,
    Store,
    StoreError,
)

BAD_KEYS = [
    "", "/abs", "a//b", "a/", "./a", "a/./b", "..", "../x", "a/../b", "a\\b", "a\x00b", "a\nb", "\x7f",
    ".trainio-tmp.abc", "a/.trainio-tmp.x", "lone\ud800surrogate",
]

# 12 MiB: above the 5 MiB part size the S3 tests use, so multipart and parallel paths run.
LARGE = 12 << 20 | 12345


def xxh(data: bytes) -> str:
    return str(xxhash.xxh3_128_hexdigest(data))


class StoreContract(ABC):
    """Store behaviour, checked against a real backend."""

    @abstractmethod
    def raw_put(self, store: Store, key: str, data: bytes) -> None:
        """Write ``key`` behind the store's back."""

    @abstractmethod
    def raw_get(self, store: Store, key: str) -> bytes:
        """Read ``key`` behind the store's back."""

    @abstractmethod
    def raw_exists(self, store: Store, key: str) -> bool:
        """Whether ``key`` exists, checked behind the store's back."""

    # -- put / get -------------------------------------------------------------

    def test_put_get_round_trip(self, store: Store) -> None:
        digest = store.put("a/b/c.bin", b"hello world")
        assert digest == xxh(b"hello world")
        assert store.get("a/b/c.bin") == b"hello world"
        assert self.raw_get(store, "a/b/c.bin") == b"hello world"

    def test_put_accepts_any_buffer(self, store: Store) -> None:
        array = np.arange(1000, dtype=np.float32).reshape(10, 100)
        store.put("arr", array)
        store.put("view", memoryview(b"0123456789")[2:5])
        store.put("ba", bytearray(b"xyz"))
        assert store.get("arr") == array.tobytes()
        assert store.get("view") == b"234"
        assert store.get("ba") == b"xyz"

    def test_overwrite_replaces(self, store: Store) -> None:
        store.put("k", b"old value")
        store.put("k", b"new")
        assert store.get("k") == b"new"

    def test_empty_object(self, store: Store) -> None:
        store.put("empty", b"")
        assert store.get("empty") == b""
        assert store.size("empty") == 0
        assert store.get("empty", 0, 0) == b""
        assert store.get_into("empty", bytearray(0)) == 0

    def test_large_object(self, store: Store) -> None:
        data = os.urandom(LARGE)
        assert store.put("big", data) == xxh(data)
        assert store.get("big") == data
        assert store.get("big", 1000, LARGE - 7) == data[1000:LARGE - 7]
        assert store.get("big", LARGE - 10) == data[-10:]
        assert self.raw_get(store, "big") == data

    def test_ranges(self, store: Store) -> None:
        store.put("r", b"0123456789")
        assert store.get("r", 2, 5) == b"234"
        assert store.get("r", 7) == b"789"
        assert store.get("r", None, 3) == b"012"
        assert store.get("r", 10) == b""
        assert store.get("r", 4, 4) == b""

    @pytest.mark.parametrize(("start", "end"), [(5, 11), (11, None), (11, 12), (0, 100), (0, 1 << 40)])
    def test_range_past_end_is_refused(self, store: Store, start: int, end: int | None) -> None:
        store.put("r", b"0123456789")
        with pytest.raises(StoreError, match="outside the object's 10 bytes") as info:  # before any allocation
            store.get("r", start, end)
        assert info.value.key == "r"

    @pytest.mark.parametrize(("start", "end"), [(-1, None), (3, 2), (0, -5)])
    def test_bad_range_is_refused(self, store: Store, start: int, end: int | None) -> None:
        store.put("r", b"0123456789")
        with pytest.raises(StoreError, match="range"):
            store.get("r", start, end)

    def test_missing_key_raises_not_found(self, store: Store) -> None:
        for call in (lambda: store.get("nope"), lambda: store.size("nope"),
                     lambda: store.get("nope", 0, 1), lambda: store.get_into("nope", bytearray(4))):
            with pytest.raises(NotFound) as info:
                call()
            assert info.value.key == "nope"
            assert store.url in str(info.value)
            assert isinstance(info.value, FileNotFoundError)

    def test_prefix_of_keys_is_not_a_key(self, store: Store) -> None:
        store.put("dir/child", b"x")
        assert not store.exists("dir")
        with pytest.raises(NotFound):
            store.get("dir")

    # -- get_into ----------------------------------------------------------------

    def test_get_into_fills_exactly(self, store: Store) -> None:
        data = os.urandom(LARGE)
        store.put("big", data)
        buffer = bytearray(LARGE - 100)
        assert store.get_into("big", buffer, 100) == LARGE - 100
        assert buffer == data[100:]
        target = np.zeros(1000, dtype=np.uint8)
        store.get_into("big", target, 5)
        assert target.tobytes() == data[5:1005]

    def test_get_into_typed_array(self, store: Store) -> None:
        source = np.arange(256, dtype=np.float64).reshape(16, 16)
        store.put("t", source)
        target = np.empty_like(source)
        store.get_into("t", target)
        np.testing.assert_array_equal(source, target)

    def test_get_into_short_object_raises(self, store: Store) -> None:
        store.put("short", b"12345")
        with pytest.raises(StoreError, match="outside the object"):
            store.get_into("short", bytearray(10))
        with pytest.raises(StoreError, match="outside the object"):
            store.get_into("short", bytearray(3), 4)

    def test_get_into_read_only_buffer_refused(self, store: Store) -> None:
        store.put("k", b"12345")
        with pytest.raises(TypeError, match="read-only"):
            store.get_into("k", b"xxxxx")

    # -- create-only -------------------------------------------------------------

    def test_create_only_put(self, store: Store) -> None:
        store.put("once", b"first", overwrite=False)
        with pytest.raises(AlreadyExists) as info:
            store.put("once", b"second", overwrite=False)
        assert isinstance(info.value, FileExistsError)
        assert store.get("once") == b"first"

    def test_create_only_put_large(self, store: Store) -> None:
        first = os.urandom(LARGE)
        store.put("once", first, overwrite=False)
        with pytest.raises(AlreadyExists):
            store.put("once", os.urandom(LARGE), overwrite=False)
        assert store.get("once") == first

    def test_create_only_race_has_one_winner(self, store: Store) -> None:
        results: list[str] = []
        lock = threading.Lock()

        def attempt(i: int) -> None:
            try:
                store.put("race", f"writer {i}".encode(), overwrite=False)
                outcome = f"won {i}"
            except AlreadyExists:
                outcome = "lost"
            with lock:
                results.append(outcome)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if r.startswith("won")]
        assert len(winners) == 1, results
        assert store.get("race") == f"writer {winners[0].split()[1]}".encode()

    # -- streamed files ----------------------------------------------------------

    def test_put_file_get_file(self, store: Store, tmp_path: Path) -> None:
        data = os.urandom(LARGE)
        source = tmp_path / "source.bin"
        source.write_bytes(data)
        assert store.put_file("files/x", source) == xxh(data)
        assert self.raw_get(store, "files/x") == data
        target = tmp_path / "out" / "target.bin"
        assert store.get_file("files/x", target, expected_xxh3=xxh(data)) == xxh(data)
        assert target.read_bytes() == data
        assert [p.name for p in target.parent.iterdir()] == ["target.bin"]

    def test_open_writer_publishes_on_commit_only(self, store: Store) -> None:
        data = os.urandom(LARGE)
        store.put("w", b"old")
        with store.open_writer("w") as writer:
            for start in range(0, LARGE, 1 << 20):
                writer.write(data[start:start + (1 << 20)])
            assert self.raw_get(store, "w") == b"old"
        assert self.raw_get(store, "w") == data
        with pytest.raises(ZeroDivisionError), store.open_writer("w") as writer:
            writer.write(b"partial")
            1 / 0  # noqa: B018 - the producer fails midway
        assert self.raw_get(store, "w") == data
        assert store.list("") == ["w"]
        writer = store.open_writer("w", overwrite=False)
        writer.write(b"x")
        with pytest.raises(AlreadyExists):
            writer.commit()
        assert self.raw_get(store, "w") == data

    def test_unsynced_writer_publishes_on_commit_and_sync_accepts_its_key(self, store: Store) -> None:
        data = os.urandom(3 << 20)
        with store.open_writer("unsynced/a", sync=False) as writer:
            writer.write(data)
        assert self.raw_get(store, "unsynced/a") == data
        store.sync(["unsynced/a"])
        store.sync([])
        with pytest.raises(InvalidKey):
            store.sync(["../outside"])

    def test_small_and_empty_files(self, store: Store, tmp_path: Path) -> None:
        for name, data in (("small", b"abc"), ("empty", b"")):
            (tmp_path / name).write_bytes(data)
            assert store.put_file(name, tmp_path / name) == xxh(data)
            assert store.get_file(name, tmp_path / f"{name}.out") == xxh(data)
            assert (tmp_path / f"{name}.out").read_bytes() == data

    def test_get_file_digest_mismatch_leaves_target_untouched(self, store: Store, tmp_path: Path) -> None:
        store.put("k", b"the real bytes")
        (tmp_path / "dl").mkdir()
        target = tmp_path / "dl" / "target.bin"
        target.write_bytes(b"previous contents")
        with pytest.raises(IntegrityError) as info:
            store.get_file("k", target, expected_xxh3="0" * 32)
        assert info.value.key == "k"
        assert info.value.expected == "0" * 32
        assert info.value.actual == xxh(b"the real bytes")
        assert target.read_bytes() == b"previous contents"
        assert [p.name for p in target.parent.iterdir()] == ["target.bin"]

    def test_get_file_missing_key(self, store: Store, tmp_path: Path) -> None:
        with pytest.raises(NotFound):
            store.get_file("nope", tmp_path / "dl" / "t")
        assert list((tmp_path / "dl").iterdir()) == []

    # -- verification ------------------------------------------------------------

    def test_verify_detects_a_flipped_byte(self, store: Store) -> None:
        data = bytearray(os.urandom(LARGE))
        digest = store.put("v", data)
        store.verify("v", digest)
        data[LARGE // 2] ^= 0x01
        self.raw_put(store, "v", bytes(data))
        with pytest.raises(IntegrityError) as info:
            store.verify("v", digest)
        assert info.value.key == "v"
        assert info.value.expected == digest
        assert "xxh3-128" in str(info.value)

    # -- exists / size / list ----------------------------------------------------

    def test_exists_and_size(self, store: Store) -> None:
        assert not store.exists("k")
        store.put("k", b"12345")
        assert store.exists("k")
        assert store.size("k") == 5

    def test_list_is_directory_scoped_and_sorted(self, store: Store) -> None:
        for key in ("b", "a/2", "a/1", "a/sub/3", "ab", "abc/4"):
            store.put(key, b"x")
        assert store.list() == ["a/1", "a/2", "a/sub/3", "ab", "abc/4", "b"]
        assert store.list("a") == ["a/1", "a/2", "a/sub/3"]
        assert store.list("a/") == ["a/1", "a/2", "a/sub/3"]
        assert store.list("a/sub") == ["a/sub/3"]
        assert store.list("b") == []
        assert store.list("missing") == []

    def test_list_dirs_names_only_direct_children(self, store: Store) -> None:
        for key in ("b", "a/2", "a/sub/3", "a/sub/deeper/4", "ab", "abc/4"):
            store.put(key, b"x")
        assert store.list_dirs() == ["a", "abc"]
        assert store.list_dirs("a") == ["sub"]
        assert store.list_dirs("a/sub/") == ["deeper"]
        assert store.list_dirs("b") == []
        assert store.list_dirs("missing") == []

    def test_list_many(self, store: Store) -> None:
        keys = [f"many/{i:04d}" for i in range(1100)]
        for key in keys:
            store.put(key, b"")
        assert store.list("many") == keys

    # -- delete / copy -------------------------------------------------------------

    def test_delete(self, store: Store) -> None:
        store.put("d/k", b"x")
        store.delete("d/k")
        assert not store.exists("d/k")
        assert not self.raw_exists(store, "d/k")
        store.delete("d/k")
        store.delete("never/was")

    def test_delete_prefix(self, store: Store) -> None:
        for key in ("p/1", "p/q/2", "pq/3", "other"):
            store.put(key, b"x")
        assert store.delete_prefix("p") == 2
        assert store.list() == ["other", "pq/3"]
        assert store.delete_prefix("p") == 0
        assert store.delete_prefix("no/such/dir") == 0
        assert store.delete_prefix("") == 2
        assert store.list() == []

    def test_copy(self, store: Store) -> None:
        data = os.urandom(LARGE)
        store.put("src", data)
        store.put("dst/y", b"old")
        store.copy("src", "dst/y")
        store.copy("src", "elsewhere/z")
        assert store.get("dst/y") == data
        assert store.get("elsewhere/z") == data
        store.put("src", b"changed")
        assert store.get("dst/y") == data, "a copy must not share later writes of its source"

    def test_copy_small_and_onto_itself(self, store: Store) -> None:
        store.put("s", b"abc")
        store.copy("s", "t")
        store.copy("s", "s")
        assert store.get("t") == store.get("s") == b"abc"

    def test_copy_missing_source(self, store: Store) -> None:
        with pytest.raises(NotFound) as info:
            store.copy("nope", "dst")
        assert info.value.key == "nope"
        assert not store.exists("dst")

    # -- keys ----------------------------------------------------------------------

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_bad_keys_are_refused_before_any_io(self, store: Store, key: str) -> None:
        for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key),
                     lambda: store.delete(key), lambda: store.copy("ok", key)):
            with pytest.raises(InvalidKey) as info:
                call()
            assert repr(key)[1:-1] in str(info.value) or key == ""
            assert isinstance(info.value, ValueError)

    @pytest.mark.parametrize("prefix", ["../", "/x", "a//b", "a/../.."])
    def test_bad_prefixes_are_refused(self, store: Store, prefix: str) -> None:
        with pytest.raises(InvalidKey):
            store.list(prefix)
        with pytest.raises(InvalidKey):
            store.delete_prefix(prefix)

    def test_non_string_key_refused(self, store: Store) -> None:
        with pytest.raises(InvalidKey):
            store.get(b"bytes-key")  # type: ignore[arg-type]

    def test_unusual_but_valid_keys(self, store: Store) -> None:
        for key in ("sp ace/ü-ñ.bin", "dots.../x", ".hidden", "a=b&c", "x" * 200):
            store.put(key, key.encode())
            assert store.get(key) == key.encode()
        assert len(store.list()) == 5

    # -- concurrency, async, pickling ------------------------------------------------

    def test_readers_never_see_a_torn_value(self, store: Store) -> None:
        size = 1 << 20
        values = [bytes([v]) * size for v in (1, 2)]
        store.put("hot", values[0])
        stop = threading.Event()
        seen: list[str] = []

        def writer() -> None:
            for i in range(30):
                store.put("hot", values[i % 2])
            stop.set()

        def reader() -> None:
            while not stop.is_set():
                data = store.get("hot")
                if data not in values:
                    seen.append(f"torn read of {len(data)} bytes")

        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen == []

    async def test_async_twins(self, store: Store, tmp_path: Path) -> None:
        digests = await asyncio.gather(*(store.put_async(f"as/{i}", bytes([i]) * 1000) for i in range(20)))
        assert digests == [xxh(bytes([i]) * 1000) for i in range(20)]
        values = await asyncio.gather(*(store.get_async(f"as/{i}", 10, 20) for i in range(20)))
        assert values == [bytes([i]) * 10 for i in range(20)]
        buffer = bytearray(1000)
        assert await store.get_into_async("as/3", buffer) == 1000
        assert buffer == bytes([3]) * 1000
        assert await store.exists_async("as/0")
        assert await store.size_async("as/0") == 1000
        assert len(await store.list_async("as")) == 20
        await store.copy_async("as/1", "copy")
        assert await store.get_async("copy") == bytes([1]) * 1000
        (tmp_path / "f").write_bytes(b"file")
        assert await store.put_file_async("f", tmp_path / "f") == xxh(b"file")
        assert await store.get_file_async("f", tmp_path / "g") == xxh(b"file")
        await store.verify_async("f", xxh(b"file"))
        await store.delete_async("copy")
        assert await store.delete_prefix_async("as") == 20
        with pytest.raises(NotFound):
            await store.get_async("copy")

    def test_pickle_round_trip(self, store: Store) -> None:
        store.put("p", b"pickled")
        clone = pickle.loads(pickle.dumps(store))
        assert clone == store
        assert hash(clone) == hash(store)
        assert clone.get("p") == b"pickled"
        clone.put("q", b"from clone")
        assert store.get("q") == b"from clone"

    def test_errors_pickle(self, store: Store) -> None:
        with pytest.raises(NotFound) as info:
            store.get("nope")
        clone = pickle.loads(pickle.dumps(info.value))
        assert type(clone) is NotFound
        assert str(clone) == str(info.value)
        assert (clone.url, clone.key) == (store.url, "nope")

    def test_usable_after_close(self, store: Store) -> None:
        store.put("k", b"v")
        store.close()
        assert store.get("k") == b"v"
