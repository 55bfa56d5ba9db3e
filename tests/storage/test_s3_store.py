"""S3Store against the store contract on a real SeaweedFS server, plus S3-only behaviour."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from xxhash import xxh3_128_hexdigest

from trainio.storage import S3Options, S3Store, Store, StoreError, open_store

from .._seaweedfs import SeaweedFS
from .store_contract import LARGE, StoreContract


@pytest.mark.slow
class TestS3Store(StoreContract):
    @pytest.fixture
    def store(self, s3_store: S3Store, seaweedfs: SeaweedFS) -> S3Store:
        self.client = seaweedfs.client()
        return s3_store

    def _full(self, store: Store, key: str) -> tuple[str, str]:
        assert isinstance(store, S3Store)
        return store.bucket, f"{store.prefix}/{key}" if store.prefix else key

    def raw_put(self, store: Store, key: str, data: bytes) -> None:
        bucket, full = self._full(store, key)
        self.client.put_object(Bucket=bucket, Key=full, Body=data)  # type: ignore[attr-defined]

    def raw_get(self, store: Store, key: str) -> bytes:
        bucket, full = self._full(store, key)
        return bytes(self.client.get_object(Bucket=bucket, Key=full)["Body"].read())  # type: ignore[attr-defined]

    def raw_exists(self, store: Store, key: str) -> bool:
        bucket, full = self._full(store, key)
        listing = self.client.list_objects_v2(Bucket=bucket, Prefix=full)  # type: ignore[attr-defined]
        return any(obj["Key"] == full for obj in listing.get("Contents", ()))


def test_large_put_is_multipart_and_leaves_no_upload(s3_store: S3Store, seaweedfs: SeaweedFS) -> None:
    data = os.urandom(LARGE)
    s3_store.put("mp", data)
    client = seaweedfs.client()
    head = client.head_object(Bucket=s3_store.bucket, Key="data/mp")  # type: ignore[attr-defined]
    assert head["ETag"].strip('"').endswith("-3"), "12 MiB in 5 MiB parts is a 3-part upload"
    assert not client.list_multipart_uploads(Bucket=s3_store.bucket).get("Uploads")  # type: ignore[attr-defined]


def test_keys_live_under_the_prefix(s3_store: S3Store, seaweedfs: SeaweedFS) -> None:
    s3_store.put("x/y", b"1")
    client = seaweedfs.client()
    client.put_object(Bucket=s3_store.bucket, Key="outside", Body=b"2")  # type: ignore[attr-defined]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_store.bucket)["Contents"]]  # type: ignore[attr-defined]
    assert sorted(keys) == ["data/x/y", "outside"]
    assert s3_store.list() == ["x/y"]
    whole = S3Store(s3_store.bucket, options=s3_store.options)
    assert whole.list() == ["data/x/y", "outside"]


def test_missing_bucket_is_named(s3_options: S3Options) -> None:
    store = S3Store("no-such-bucket-here", options=s3_options)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        store.get("k")


@pytest.mark.parametrize("bucket", ["b1", "UPPER", "under_score", "-dash", "a" * 64, "dot..dot"])
def test_invalid_bucket_names_are_refused(bucket: str) -> None:
    with pytest.raises(StoreError, match="not a valid bucket name"):
        S3Store(bucket)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="part_size_bytes"):
        S3Options(part_size_bytes=1 << 20)
    with pytest.raises(ValueError, match="multipart_threshold_bytes"):
        S3Options(part_size_bytes=8 << 20, multipart_threshold_bytes=6 << 20)
    with pytest.raises(ValueError, match="max_concurrency"):
        S3Options(max_concurrency=0)


def test_open_store_s3_urls(s3_options: S3Options, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store("s3://test-bucket/some/prefix/", options=s3_options)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.url) == ("test-bucket", "some/prefix", "s3://test-bucket/some/prefix")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    from_env = open_store("s3://test-bucket", options=replace(s3_options, endpoint_url=None))
    assert isinstance(from_env, S3Store) and from_env.options.endpoint_url == "http://127.0.0.1:9"
    with pytest.raises(StoreError, match="needs a bucket"):
        open_store("s3:///nobucket")
    with pytest.raises(StoreError, match="options must be S3Options"):
        from trainio.storage import LocalOptions

        open_store("s3://test-bucket", options=LocalOptions())


@pytest.mark.slow
def test_read_to_fills_a_file_in_place_or_in_order(s3_store: S3Store, tmp_path: Path) -> None:
    """Parts land at their offsets in a file open for reading and writing, in order in a write-only one; the
    digest is the same either way, with the size given (one request fewer) or asked."""
    data = os.urandom(2 * s3_store.options.part_size_bytes + 12345)
    expected = s3_store.put("big", data)
    for mode, size in (("w+b", None), ("w+b", len(data)), ("wb", None), ("wb", len(data))):
        with open(tmp_path / "out", mode, buffering=0) as file:
            assert s3_store.read_to("big", file, size=size) == expected, (mode, size)
        assert (tmp_path / "out").read_bytes() == data, (mode, size)
    with open(tmp_path / "prefix", "w+b", buffering=0) as file:  # a size below the object's: exactly that prefix
        assert s3_store.read_to("big", file, size=1000) == xxh3_128_hexdigest(data[:1000])
    with open(tmp_path / "past", "w+b", buffering=0) as file, pytest.raises(StoreError, match="'big'"):
        s3_store.read_to("big", file, size=len(data) + 1)
