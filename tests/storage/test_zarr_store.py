"""ZarrStore against zarr-python's own StoreTests, over LocalStore and over S3Store on SeaweedFS.

Each backend's out-of-band ``set``/``get`` helpers go around the adapter and
the trainio store (files on disk; a plain boto3 client), so the suite checks
where the bytes really land. The readback tests write a hierarchy through
ZarrStore with zarr's normal API and read it with zarr's own stores
(``zarr.storage.LocalStore``, ``zarr.storage.ObjectStore`` over obstore).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import zarr
import zarr.storage
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.abc.store import Store as ZarrABCStore
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.testing.store import StoreTests

from trainio.storage import InvalidKey, LocalStore, S3Options, S3Store, Store, ZarrStore

from .._seaweedfs import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS

DATA = b"0123456789"


class _AdapterTests:
    """Checks beyond zarr's suite, run on every backend: lenient ranges, keys trainio rejects."""

    def test_store_repr(self, store: ZarrStore) -> None:
        assert repr(store) == f"ZarrStore({store.store!r}, prefix='zarr/root', read_only=False)"
        assert str(store) == f"{store.store.url}/zarr/root"

    def test_store_supports_writes(self, store: ZarrStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: ZarrStore) -> None:
        assert store.supports_listing

    @pytest.mark.parametrize(
        ("byte_range", "expected"),
        [
            (RangeByteRequest(4, 100), DATA[4:]),
            (RangeByteRequest(20, 30), b""),
            (RangeByteRequest(2, 1 << 40), DATA[2:]),
            (RangeByteRequest(3, 3), b""),
            (OffsetByteRequest(10), b""),
            (OffsetByteRequest(25), b""),
            (SuffixByteRequest(100), DATA),
            (SuffixByteRequest(0), b""),
        ],
    )
    async def test_lenient_ranges(self, store: ZarrStore, byte_range: ByteRequest, expected: bytes) -> None:
        await store.set("c/0", cpu.Buffer.from_bytes(DATA))
        observed = await store.get("c/0", default_buffer_prototype(), byte_range)
        assert observed is not None and observed.to_bytes() == expected
        synced = store.get_sync("c/0", byte_range=byte_range)
        assert synced is not None and synced.to_bytes() == expected

    @pytest.mark.parametrize("byte_range", [None, RangeByteRequest(0, 2), OffsetByteRequest(1), SuffixByteRequest(2)])
    async def test_missing_key_reads_none(self, store: ZarrStore, byte_range: ByteRequest | None) -> None:
        assert await store.get("c/9", default_buffer_prototype(), byte_range) is None
        assert store.get_sync("c/9", byte_range=byte_range) is None

    async def test_bad_ranges_raise(self, store: ZarrStore) -> None:
        await store.set("c/0", cpu.Buffer.from_bytes(DATA))
        for bad in (RangeByteRequest(5, 2), RangeByteRequest(-1, 2), OffsetByteRequest(-1), SuffixByteRequest(-1)):
            with pytest.raises(ValueError):
                await store.get("c/0", default_buffer_prototype(), bad)

    @pytest.mark.parametrize("key", ["", "a//b", "a/../b", "a/./b"])
    async def test_keys_trainio_rejects(self, store: ZarrStore, key: str) -> None:
        assert await store.get(key, default_buffer_prototype()) is None
        assert not await store.exists(key)
        with pytest.raises(FileNotFoundError):
            await store.getsize(key)
        await store.delete(key)
        assert [k async for k in store.list_prefix(key)] == []
        with pytest.raises(InvalidKey):
            await store.set(key, cpu.Buffer.from_bytes(b"x"))

    async def test_key_under_a_file_reads_missing(self, store: ZarrStore) -> None:
        await store.set("zarr.json", cpu.Buffer.from_bytes(b"{}"))
        assert await store.get("zarr.json/c/0", default_buffer_prototype()) is None
        assert not await store.exists("zarr.json/c/0")
        await store.delete("zarr.json/c/0")

    async def test_list_prefix_is_a_string_prefix(self, store: ZarrStore) -> None:
        for key in ("foo/a", "foo-bar/b", "food", "g/h"):
            await store.set(key, cpu.Buffer.from_bytes(b""))
        assert [k async for k in store.list_prefix("foo")] == ["foo-bar/b", "foo/a", "food"]
        assert [k async for k in store.list_prefix("foo/")] == ["foo/a"]
        assert sorted([k async for k in store.list_dir("")]) == ["foo", "foo-bar", "food", "g"]

    async def test_keys_outside_the_prefix_are_untouched(self, store: ZarrStore) -> None:
        inner, outside = store.store, ZarrStore(store.store, "elsewhere")
        await outside.set("zarr.json", cpu.Buffer.from_bytes(b"keep"))
        await store.set("zarr.json", cpu.Buffer.from_bytes(b"{}"))
        await store.clear()
        assert await store.is_empty("")
        assert [k async for k in store.list()] == []
        assert inner.get("elsewhere/zarr.json") == b"keep"


class TestZarrStoreLocal(_AdapterTests, StoreTests[ZarrStore, cpu.Buffer]):
    """ZarrStore over LocalStore, at a prefix; out of band: the files themselves."""

    store_cls = ZarrStore
    buffer_cls = cpu.Buffer

    @pytest.fixture
    def store_kwargs(self, tmp_path: Path) -> dict[str, Any]:
        return {"store": LocalStore(tmp_path / "root"), "prefix": "zarr/root"}

    @staticmethod
    def _path(store: ZarrStore, key: str) -> Path:
        inner = store.store
        assert isinstance(inner, LocalStore)
        return inner.root / store.prefix / key

    async def set(self, store: ZarrStore, key: str, value: cpu.Buffer) -> None:  # type: ignore[override]
        path = self._path(store, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(value.to_bytes())

    async def get(self, store: ZarrStore, key: str) -> cpu.Buffer:
        return cpu.Buffer.from_bytes(self._path(store, key).read_bytes())

    def test_not_equal_across_prefix_or_mode(self, store: ZarrStore) -> None:
        assert store != ZarrStore(store.store, "zarr/other")
        assert store != store.with_read_only(True)
        assert store == store.with_read_only(False)
        assert hash(store) == hash(store.with_read_only(False))


@pytest.mark.slow
class TestZarrStoreS3(_AdapterTests, StoreTests[ZarrStore, cpu.Buffer]):
    """ZarrStore over S3Store on SeaweedFS; out of band: a plain boto3 client."""

    store_cls = ZarrStore
    buffer_cls = cpu.Buffer

    @pytest.fixture
    def store_kwargs(self, seaweedfs: SeaweedFS, s3_bucket: str, s3_options: S3Options) -> Iterator[dict[str, Any]]:
        self._client = cast(Any, seaweedfs.client())
        inner = S3Store(s3_bucket, "data", options=s3_options)
        yield {"store": inner, "prefix": "zarr/root"}
        inner.close()
        self._client.close()

    @staticmethod
    def _where(store: ZarrStore, key: str) -> tuple[str, str]:
        inner = store.store
        assert isinstance(inner, S3Store)
        return inner.bucket, f"{inner.prefix}/{store.prefix}/{key}"

    async def set(self, store: ZarrStore, key: str, value: cpu.Buffer) -> None:  # type: ignore[override]
        bucket, name = self._where(store, key)
        self._client.put_object(Bucket=bucket, Key=name, Body=value.to_bytes())

    async def get(self, store: ZarrStore, key: str) -> cpu.Buffer:
        bucket, name = self._where(store, key)
        return cpu.Buffer.from_bytes(self._client.get_object(Bucket=bucket, Key=name)["Body"].read())


class _ThreadRecordingStore(LocalStore):
    """A LocalStore that records which thread runs each blocking read and write."""

    threads: list[str] = []

    def _get(self, key: str, start: int, end: int | None) -> bytes:
        self.threads.append(threading.current_thread().name)
        return super()._get(key, start, end)

    def _put(self, key: str, data: memoryview, overwrite: bool) -> None:
        self.threads.append(threading.current_thread().name)
        super()._put(key, data, overwrite)


async def test_async_methods_run_on_the_trainio_pool(tmp_path: Path) -> None:
    inner = _ThreadRecordingStore(tmp_path)
    inner.threads = []
    store = ZarrStore(inner, "p")
    await store.set("c/0", cpu.Buffer.from_bytes(DATA))
    await store.get("c/0", default_buffer_prototype(), RangeByteRequest(1, 3))
    await store.get("c/0", default_buffer_prototype(), SuffixByteRequest(3))
    assert len(inner.threads) == 3
    assert all(name.startswith("trainio-io") for name in inner.threads), inner.threads
    inner.close()


# -- readback: written through ZarrStore with zarr's API, read with zarr's own stores ----


def _write_group(store: Store, prefix: str) -> dict[str, np.ndarray[Any, Any]]:
    """A v3 group with a chunked float32 2-D array, a sharded one and an int64 1-D array; returns the values."""
    rng = np.random.default_rng(7)
    values: dict[str, np.ndarray[Any, Any]] = {
        "weights": rng.standard_normal((37, 23)).astype("float32"),
        "sharded": rng.standard_normal((40, 12)).astype("float32"),
        "ids": np.arange(-50, 1000, 7, dtype="int64"),
    }
    group = zarr.open_group(store=ZarrStore(store, prefix), mode="w", zarr_format=3)
    group.attrs["step"] = 42
    group.create_array("weights", shape=(37, 23), chunks=(10, 8), dtype="float32")[...] = values["weights"]
    group.create_array("sharded", shape=(40, 12), chunks=(5, 4), shards=(20, 12), dtype="float32")[...] = (
        values["sharded"]
    )
    group.create_group("nested").create_array("ids", shape=values["ids"].shape, chunks=(32,), dtype="int64")[...] = (
        values["ids"]
    )
    return values


def _check_group(zstore: ZarrABCStore, values: dict[str, np.ndarray[Any, Any]]) -> None:
    group = zarr.open_group(store=zstore, mode="r", zarr_format=3)
    assert group.attrs["step"] == 42
    for name, path in (("weights", "weights"), ("sharded", "sharded"), ("ids", "nested/ids")):
        array = group[path]
        assert isinstance(array, zarr.Array)
        assert array.dtype == values[name].dtype
        np.testing.assert_array_equal(array[...], values[name])
    np.testing.assert_array_equal(group["sharded"][3:17, 5:9], values["sharded"][3:17, 5:9])  # type: ignore[index]


def test_readback_with_zarr_localstore(tmp_path: Path) -> None:
    values = _write_group(LocalStore(tmp_path), "runs/a")
    _check_group(zarr.storage.LocalStore(tmp_path / "runs" / "a", read_only=True), values)
    _check_group(ZarrStore(LocalStore(tmp_path), "runs/a", read_only=True), values)


def test_readback_with_zarr_objectstore(seaweedfs: SeaweedFS, s3_bucket: str, s3_options: S3Options) -> None:
    obstore = pytest.importorskip("obstore.store")
    with S3Store(s3_bucket, "data", options=s3_options) as inner:
        values = _write_group(inner, "runs/a")
        upstream = obstore.S3Store(
            s3_bucket, prefix="data/runs/a", endpoint=seaweedfs.endpoint, region=REGION,
            access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY, client_options={"allow_http": True},
        )
        _check_group(zarr.storage.ObjectStore(upstream, read_only=True), values)
        _check_group(ZarrStore(inner, "runs/a", read_only=True), values)
