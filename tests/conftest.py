"""Shared fixtures: a real SeaweedFS S3 server for the whole session, a fresh bucket per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainio.storage import RetryPolicy, S3Options, S3Store

from ._seaweedfs import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS

_bucket_numbers = itertools.count()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS server (master, volume, filer, S3) for the session.

    It listens on free 127.0.0.1 ports with every gRPC port given explicitly
    (its default of port + 10000 is often taken or invalid for ephemeral
    ports) and its unix sockets in the temp dir, so parallel sessions never
    collide. Starting takes a few seconds, hence once per session; it is killed
    by pid at the end.
    """
    server = SeaweedFS.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_options(seaweedfs: SeaweedFS) -> S3Options:
    """Options for the test server: 5 MiB parts (the S3 minimum) so multipart paths run on small data."""
    return S3Options(
        endpoint_url=seaweedfs.endpoint,
        region=REGION,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        part_size_bytes=5 << 20,
        multipart_threshold_bytes=5 << 20,
        max_concurrency=4,
        retry=RetryPolicy(max_attempts=4, initial_backoff_s=0.05, max_backoff_s=0.5),
    )


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS) -> Iterator[str]:
    """A fresh, empty bucket with a DNS-valid name, deleted after the test."""
    name = f"test-bucket-{next(_bucket_numbers)}"
    client = seaweedfs.client()
    client.create_bucket(Bucket=name)  # type: ignore[attr-defined]
    yield name
    try:
        client.delete_bucket(Bucket=name)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - the server deletes non-empty buckets; a failure here is not the test's
        pass


@pytest.fixture
def s3_store(s3_bucket: str, s3_options: S3Options) -> Iterator[S3Store]:
    """An S3Store on a fresh bucket, under a prefix."""
    store = S3Store(s3_bucket, "data", options=s3_options)
    yield store
    store.close()


@pytest.fixture
def s3_url(s3_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ``s3://`` URL of ``s3_store``, with the environment set so ``open_store`` reaches the test server."""
    options = s3_store.options
    monkeypatch.setenv("AWS_ENDPOINT_URL", options.endpoint_url or "")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options.access_key_id or "")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options.secret_access_key or "")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    return f"s3://{s3_store.bucket}/{s3_store.prefix}"


@pytest.fixture
def repo_root() -> Path:
    """The repository's top folder."""
    return Path(__file__).resolve().parent.parent
