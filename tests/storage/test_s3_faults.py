"""S3Store failure paths against a real SeaweedFS server, behind a fault-injecting proxy.

Nothing here mocks boto3: requests go over real sockets to ``FaultyProxy``,
which forwards them to SeaweedFS or answers 503 SlowDown / 403 AccessDenied,
drops the connection, loses the answer of a request it forwarded, or cuts a
GET's body off midway. Every outcome is checked out of band, with a plain
boto3 client talking to SeaweedFS directly.

The proxy's faults follow one seeded random sequence (the n-th request gets
the n-th draw). ``SEED`` was picked so that the first draws are faults of
every kind: tests assert that faults really happened, and would fail if a
change to the proxy or the seed left them fault-free.
"""

from __future__ import annotations

import http.client
import http.server
import logging
import os
import pickle
import random
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from trainio.storage import (
    AlreadyExists,
    RetryPolicy,
    S3Options,
    S3Store,
    ShardCache,
    StoreError,
    StoreUnavailable,
    digest,
)

from .._seaweedfs import ACCESS_KEY, SECRET_KEY, SeaweedFS, free_ports
from ._faulty_proxy import Fault, FaultyProxy, Request

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` is the quick lane; .ci/run runs everything

MIB = 1 << 20
BIG = 23 * MIB  # 5 parts of 5 MiB: four full ones and a 3 MiB tail
FAULT_RATE = 0.3
SEED = 8  # see the module docstring; test_seed_starts_with_every_fault_kind guards the choice
PATIENT = RetryPolicy(max_attempts=8, initial_backoff_s=0.01, max_backoff_s=0.1)

READ_FAULTS = (Fault.SLOW_DOWN, Fault.DROP, Fault.CUT_BODY)
WRITE_FAULTS = (Fault.SLOW_DOWN, Fault.DROP)


# -- helpers ---------------------------------------------------------------------------


def payload(size: int, seed: int = 1) -> bytes:
    """``size`` reproducible pseudo-random bytes (incompressible, and different per seed)."""
    return random.Random(seed).randbytes(size)


def is_upload_part(request: Request) -> bool:
    """Whether ``request`` is an UploadPart (a PUT carrying a part number and an upload id)."""
    return request.method == "PUT" and "partNumber=" in request.query and "uploadId=" in request.query


def is_part(number: int) -> Callable[[Request], bool]:
    """A filter matching the UploadPart requests of part ``number`` only."""
    return lambda request: is_upload_part(request) and f"partNumber={number}" in request.query.split("&")


def is_complete(request: Request) -> bool:
    """Whether ``request`` is a CompleteMultipartUpload (a POST carrying an upload id)."""
    return request.method == "POST" and "uploadId=" in request.query


def is_abort(request: Request) -> bool:
    """Whether ``request`` is an AbortMultipartUpload (a DELETE carrying an upload id)."""
    return request.method == "DELETE" and "uploadId=" in request.query


def first_n(n: int, matches: Callable[[Request], bool]) -> Callable[[Request], bool]:
    """A filter matching only the first ``n`` requests that ``matches`` accepts (the proxy calls it under its lock)."""
    left = [n]

    def match(request: Request) -> bool:
        if left[0] > 0 and matches(request):
            left[0] -= 1
            return True
        return False

    return match


def either(*filters: Callable[[Request], bool]) -> Callable[[Request], bool]:
    """A filter matching what any of ``filters`` matches; each is asked in turn until one accepts."""
    return lambda request: any(f(request) for f in filters)


def raw_get(seaweedfs: SeaweedFS, bucket: str, key: str) -> bytes:
    """The object's bytes, read from SeaweedFS directly (not through the proxy)."""
    client: Any = seaweedfs.client()
    return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def raw_keys(seaweedfs: SeaweedFS, bucket: str) -> list[str]:
    """Every object key in ``bucket``, listed by SeaweedFS directly."""
    client: Any = seaweedfs.client()
    return [obj["Key"] for obj in client.list_objects_v2(Bucket=bucket).get("Contents", ())]


def raw_uploads(seaweedfs: SeaweedFS, bucket: str) -> list[dict[str, Any]]:
    """The unfinished multipart uploads in ``bucket``, listed by SeaweedFS directly."""
    client: Any = seaweedfs.client()
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", ()))


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture
def proxy(seaweedfs: SeaweedFS, request: pytest.FixtureRequest) -> Iterator[FaultyProxy]:
    """A fault-free proxy in front of the session's SeaweedFS (tests switch faults on), closed after the test.

    The faults it injected are recorded as the test's ``faults_injected`` user property (see ``--junitxml``).
    """
    with FaultyProxy(seaweedfs.endpoint, seed=SEED) as faulty:
        yield faulty
    counts = {kind.value: n for kind, n in sorted(faulty.injected.items(), key=lambda item: item[0].value)}
    request.node.user_properties.append(("faults_injected", counts))


@pytest.fixture
def faulty_options(s3_options: S3Options, proxy: FaultyProxy) -> S3Options:
    """The test server's options, pointed at the proxy, with 8 tries per request (enough for 30% faults)."""
    return replace(s3_options, endpoint_url=proxy.endpoint, retry=PATIENT)


@pytest.fixture
def faulty_store(s3_bucket: str, faulty_options: S3Options) -> Iterator[S3Store]:
    """An S3Store on a fresh bucket, under the prefix ``data``, talking through the proxy."""
    store = S3Store(s3_bucket, "data", options=faulty_options)
    yield store
    store.close()


@pytest.fixture
def backoffs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff sleeps S3Store takes between retries, recorded (and skipped) instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr("trainio.storage._s3_base.time.sleep", recorded.append)
    return recorded


@pytest.fixture
def down_endpoint() -> str:
    """The URL of a loopback port that was free a moment ago: nothing listens there."""
    return f"http://127.0.0.1:{free_ports(1)[0]}"


# -- the proxy itself ------------------------------------------------------------------


def test_seed_starts_with_every_fault_kind() -> None:
    """Guards SEED: the first draws hold every read fault (3 kinds) and every write fault (2 kinds)."""

    def first_faults(kinds: tuple[Fault, ...], draws: int) -> set[Fault]:
        rng = random.Random(SEED)
        found = set()
        for _ in range(draws):
            if rng.random() < FAULT_RATE:
                found.add(rng.choice(kinds))
        return found

    assert first_faults(READ_FAULTS, 3) == set(READ_FAULTS)
    assert first_faults(WRITE_FAULTS, 6) == set(WRITE_FAULTS)


class _Echo(http.server.BaseHTTPRequestHandler):
    """An upstream that answers every PUT with the length of the body it received, and keeps connections open."""

    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = f"{len(body)} {digest(body)} {self.headers.get('Transfer-Encoding')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep the test output quiet
        pass


def test_proxy_relays_chunked_and_continued_bodies_on_one_connection() -> None:
    """Chunked bodies and Expect: 100-continue pass through intact, several requests to a connection.

    botocore sends Content-Length bodies, with Expect: 100-continue for file
    objects; chunked ones are covered so the proxy stays faithful to any client.
    """
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    serving = threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    serving.start()
    try:
        with FaultyProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as faulty:
            port = int(faulty.endpoint.rsplit(":", 1)[1])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            body = payload(100_000)
            conn.request("PUT", "/a", body=iter([body[:1000], body[1000:]]), encode_chunked=True)
            assert conn.getresponse().read() == f"100000 {digest(body)} None".encode()
            conn.request("PUT", "/b", body=body, headers={"Expect": "100-continue"})
            response = conn.getresponse()
            assert response.status == 200, "a 100 Continue interim answer must not be taken for the answer"
            assert response.read() == f"100000 {digest(body)} None".encode()
            conn.close()
            assert [(s.method, s.chunked, s.body_bytes) for s in faulty.requests()] == [
                ("PUT", True, 100_000), ("PUT", False, 100_000)
            ]
    finally:
        upstream.shutdown()
        upstream.server_close()
        serving.join(timeout=5)


# -- faults that retries must absorb ---------------------------------------------------


@pytest.mark.parametrize("how", ["put", "put_file"])
def test_multipart_upload_survives_faults(
    how: str, faulty_store: S3Store, proxy: FaultyProxy, seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    """A 5-part upload through 30% SlowDown/dropped requests lands intact, as a multipart object."""
    data = payload(BIG)
    proxy.configure(fault_rate=FAULT_RATE, faults=WRITE_FAULTS)
    if how == "put":
        returned = faulty_store.put("big", data)
    else:
        (tmp_path / "big").write_bytes(data)
        returned = faulty_store.put_file("big", tmp_path / "big")
    proxy.configure(fault_rate=0.0)

    assert returned == digest(data)
    assert raw_get(seaweedfs, faulty_store.bucket, "data/big") == data
    client: Any = seaweedfs.client()
    etag = client.head_object(Bucket=faulty_store.bucket, Key="data/big")["ETag"]
    assert etag.strip('"').endswith("-5"), f"23 MiB in 5 MiB parts is a 5-part upload, got ETag {etag}"
    assert proxy.injected[Fault.SLOW_DOWN] > 0 and proxy.injected[Fault.DROP] > 0, proxy.injected
    assert raw_uploads(seaweedfs, faulty_store.bucket) == []


@pytest.mark.parametrize("how", ["get", "get_range", "get_into_offset", "get_file", "read_to_in_place",
                                 "read_to_sized"])
def test_parallel_reads_survive_faults(
    how: str, faulty_store: S3Store, proxy: FaultyProxy, seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    """Whole, ranged and buffered reads through 30% SlowDown/dropped/cut-off answers return exactly the bytes stored."""
    data = payload(BIG)
    client: Any = seaweedfs.client()
    client.put_object(Bucket=faulty_store.bucket, Key="data/big", Body=data)
    proxy.configure(fault_rate=FAULT_RATE, faults=READ_FAULTS)

    if how == "get":
        assert faulty_store.get("big") == data
    elif how == "get_range":
        start, end = 3 * MIB + 7, 19 * MIB + 3
        assert faulty_store.get("big", start, end) == data[start:end]
    elif how == "get_into_offset":
        offset = 7 * MIB + 5
        buffer = bytearray(12 * MIB)
        assert faulty_store.get_into("big", buffer, offset) == len(buffer)
        assert buffer == data[offset:offset + len(buffer)]
    elif how.startswith("read_to"):  # a file open for reading too: parts written where they go, hashed read back
        size = len(data) if how == "read_to_sized" else None
        with open(tmp_path / "big", "w+b", buffering=0) as file:
            assert faulty_store.read_to("big", file, size=size) == digest(data)
        assert (tmp_path / "big").read_bytes() == data
    else:
        target = tmp_path / "out" / "big"
        target.parent.mkdir()
        assert faulty_store.get_file("big", target, expected_xxh3=digest(data)) == digest(data)
        assert target.read_bytes() == data
        assert os.listdir(target.parent) == ["big"], "no temp file may be left beside the download"

    assert all(proxy.injected[kind] > 0 for kind in READ_FAULTS), proxy.injected


def test_small_operations_survive_faults(faulty_store: S3Store, proxy: FaultyProxy, seaweedfs: SeaweedFS) -> None:
    """Single-request operations and a multipart server-side copy all absorb 30% faults."""
    big = payload(BIG, seed=2)
    client: Any = seaweedfs.client()
    client.put_object(Bucket=faulty_store.bucket, Key="data/src", Body=big)
    proxy.configure(fault_rate=FAULT_RATE, faults=READ_FAULTS)

    faulty_store.put("a/one", b"1" * 1000)
    faulty_store.put("a/two", b"2" * 10, overwrite=False)
    assert faulty_store.size("a/one") == 1000
    assert faulty_store.exists("a/two") and not faulty_store.exists("a/three")
    assert faulty_store.get("a/two") == b"2" * 10
    assert faulty_store.list("a") == ["a/one", "a/two"]
    faulty_store.copy("src", "dst")
    faulty_store.delete("a/one")
    assert faulty_store.delete_prefix("a") == 1
    proxy.configure(fault_rate=0.0)

    assert sorted(raw_keys(seaweedfs, faulty_store.bucket)) == ["data/dst", "data/src"]
    assert raw_get(seaweedfs, faulty_store.bucket, "data/dst") == big
    assert raw_uploads(seaweedfs, faulty_store.bucket) == []
    assert proxy.total_injected > 0, proxy.injected


@pytest.mark.parametrize(
    ("size", "lose"),
    [(1000, lambda r: r.method == "PUT"), (BIG, is_complete)],
    ids=["single_put", "multipart_complete"],
)
def test_lost_answer_to_a_create_only_write_is_not_a_conflict(
    size: int, lose: Callable[[Request], bool], faulty_store: S3Store, proxy: FaultyProxy, seaweedfs: SeaweedFS
) -> None:
    """A create-only write whose request the server carried out but whose answer was lost still succeeds.

    The retry finds the key present, written by the first try; that is this
    write's own success, not someone else's object (``AlreadyExists``).
    """
    data = payload(size, seed=3)
    proxy.configure(fault_rate=1.0, faults=[Fault.LOST_RESPONSE], match=first_n(1, lose))
    faulty_store.put("manifest", data, overwrite=False)

    assert proxy.injected[Fault.LOST_RESPONSE] == 1
    assert raw_get(seaweedfs, faulty_store.bucket, "data/manifest") == data
    assert raw_uploads(seaweedfs, faulty_store.bucket) == []
    with pytest.raises(AlreadyExists):
        faulty_store.put("manifest", b"other bytes", overwrite=False)


# -- faults that must end in a clean error ---------------------------------------------


@pytest.mark.parametrize(
    ("how", "fail"),
    [
        ("put", is_upload_part),
        ("put", is_part(3)),
        ("put_file", is_part(5)),
        ("put", is_complete),
    ],
    ids=["every_part", "part_3", "put_file_part_5", "complete"],
)
def test_failed_multipart_upload_is_aborted(
    how: str,
    fail: Callable[[Request], bool],
    faulty_store: S3Store,
    proxy: FaultyProxy,
    seaweedfs: SeaweedFS,
    tmp_path: Path,
) -> None:
    """An upload whose parts (or completion) keep failing raises, leaves no object and no unfinished upload."""
    data = payload(BIG, seed=4)
    proxy.configure(fault_rate=1.0, faults=WRITE_FAULTS, match=fail)
    with pytest.raises(StoreUnavailable) as caught:
        if how == "put":
            faulty_store.put("big", data)
        else:
            (tmp_path / "big").write_bytes(data)
            faulty_store.put_file("big", tmp_path / "big")

    assert "'big'" in str(caught.value) and faulty_store.bucket in str(caught.value)
    assert proxy.total_injected >= PATIENT.max_attempts
    assert len(proxy.requests("DELETE", "uploadId=")) == 1, "exactly one abort"
    assert raw_keys(seaweedfs, faulty_store.bucket) == []
    assert raw_uploads(seaweedfs, faulty_store.bucket) == []


def test_abort_of_a_failed_upload_is_retried(faulty_store: S3Store, proxy: FaultyProxy, seaweedfs: SeaweedFS) -> None:
    """The abort is a request like any other: one SlowDown on it must not leave the upload behind."""
    data = payload(BIG, seed=5)
    proxy.configure(fault_rate=1.0, faults=[Fault.SLOW_DOWN], match=either(is_part(2), first_n(1, is_abort)))
    with pytest.raises(StoreUnavailable):
        faulty_store.put("big", data)

    aborts = proxy.requests("DELETE", "uploadId=")
    assert aborts and aborts[0].fault is Fault.SLOW_DOWN
    assert raw_keys(seaweedfs, faulty_store.bucket) == []
    assert raw_uploads(seaweedfs, faulty_store.bucket) == [], "the abort was not retried after one SlowDown"


def is_range_from(offset: int) -> Callable[[Request], bool]:
    """A filter matching the ranged GETs that start at byte ``offset``."""
    return lambda request: request.method == "GET" and (request.header("Range") or "").startswith(f"bytes={offset}-")


@pytest.mark.parametrize("how", ["get", "get_file", "cache"])
def test_failed_download_leaves_nothing_behind(
    how: str, faulty_store: S3Store, proxy: FaultyProxy, seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    """A download whose second part is always cut off midway raises StoreUnavailable; no file, not even a temp one
    (the cache's too, which writes the parts in place)."""
    client: Any = seaweedfs.client()
    data = payload(BIG)
    client.put_object(Bucket=faulty_store.bucket, Key="data/big", Body=data)
    proxy.configure(fault_rate=1.0, faults=[Fault.CUT_BODY], match=is_range_from(5 * MIB))
    target = tmp_path / "out" / "big"
    target.parent.mkdir()
    cache = ShardCache(faulty_store, tmp_path / "cache", 4 * BIG)
    with pytest.raises(StoreUnavailable) as caught:
        if how == "get":
            faulty_store.get("big")
        elif how == "get_file":
            faulty_store.get_file("big", target)
        else:
            cache.fetch("big", expected_xxh3=digest(data), size=len(data))

    assert proxy.injected[Fault.CUT_BODY] == PATIENT.max_attempts
    assert "'big'" in str(caught.value)
    assert os.listdir(target.parent) == [] and os.listdir(tmp_path / "cache" / "tmp") == []
    assert cache.used_bytes() == 0 and not cache.contains("big", expected_xxh3=digest(data))


@pytest.mark.parametrize("kind", [Fault.SLOW_DOWN, Fault.DROP])
def test_persistent_retryable_fault_stops_after_max_attempts(
    kind: Fault, faulty_store: S3Store, proxy: FaultyProxy
) -> None:
    """A request that always meets a retryable fault is tried exactly ``max_attempts`` times, then StoreUnavailable."""
    proxy.configure(fault_rate=1.0, faults=[kind])
    with pytest.raises(StoreUnavailable) as caught:
        faulty_store.get("some/key")

    assert len(proxy.requests("GET")) == PATIENT.max_attempts
    assert proxy.injected[kind] == PATIENT.max_attempts
    message = str(caught.value)
    assert f"{PATIENT.max_attempts} tries" in message
    assert proxy.endpoint in message and faulty_store.bucket in message and "'some/key'" in message


@pytest.mark.parametrize("how", ["get", "size", "put", "put_multipart", "list"])
def test_non_retryable_fault_is_tried_once(
    how: str, faulty_store: S3Store, proxy: FaultyProxy, seaweedfs: SeaweedFS, backoffs: list[float]
) -> None:
    """403 AccessDenied on every request fails at the first try with a plain StoreError, never StoreUnavailable."""
    proxy.configure(fault_rate=1.0, faults=[Fault.ACCESS_DENIED])
    operations: dict[str, Callable[[], object]] = {
        "get": lambda: faulty_store.get("k"),
        "size": lambda: faulty_store.size("k"),
        "put": lambda: faulty_store.put("k", b"x"),
        "put_multipart": lambda: faulty_store.put("k", payload(BIG)),
        "list": lambda: faulty_store.list("k"),
    }
    with pytest.raises(StoreError) as caught:
        operations[how]()

    assert not isinstance(caught.value, StoreUnavailable)
    assert "access denied" in str(caught.value) and "'k'" in str(caught.value)
    assert len(proxy.requests()) == 1, [(s.method, s.target) for s in proxy.requests()]
    assert backoffs == [], "no backoff may be slept before giving up"
    assert raw_keys(seaweedfs, faulty_store.bucket) == []


@pytest.mark.parametrize("how", ["get", "get_file", "size", "put", "put_multipart"])
def test_down_endpoint_is_unavailable_within_retry_budget(
    how: str, s3_options: S3Options, down_endpoint: str, tmp_path: Path, backoffs: list[float]
) -> None:
    """Nothing listening: StoreUnavailable after exactly ``max_attempts`` tries, naming endpoint, bucket and key."""
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.05, max_backoff_s=0.2)
    options = replace(s3_options, endpoint_url=down_endpoint, retry=policy, connect_timeout_s=1.0)
    operations: dict[str, Callable[[S3Store], object]] = {
        "get": lambda s: s.get("some/key"),
        "get_file": lambda s: s.get_file("some/key", tmp_path / "out"),
        "size": lambda s: s.size("some/key"),
        "put": lambda s: s.put("some/key", b"x"),
        "put_multipart": lambda s: s.put("some/key", payload(BIG)),
    }
    with S3Store("no-such-host-bucket", "pre", options=options) as store:
        with pytest.raises(StoreUnavailable) as caught:
            operations[how](store)

    # Exactly max_attempts tries: a backoff before each retry, each within the policy's cap for that retry.
    caps = [min(policy.max_backoff_s, policy.initial_backoff_s * 2.0 ** (n - 1)) for n in range(1, policy.max_attempts)]
    assert len(backoffs) == len(caps), backoffs
    assert all(0 <= slept <= cap for slept, cap in zip(backoffs, caps)), (backoffs, caps)
    message = str(caught.value)
    assert down_endpoint in message, message
    assert "no-such-host-bucket" in message and "'some/key'" in message, message
    assert f"{policy.max_attempts} tries" in message, message
    assert not (tmp_path / "out").exists()


# -- credentials -----------------------------------------------------------------------


def test_credentials_never_appear_in_errors_reprs_or_logs(
    faulty_store: S3Store,
    faulty_options: S3Options,
    proxy: FaultyProxy,
    down_endpoint: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The secret key is in no error message, traceback, repr or log record (botocore's included).

    botocore's DEBUG logs do show the access key id (in the signed
    Authorization header); trainio's own messages and reprs show neither.
    """
    caplog.set_level(logging.DEBUG, logger="trainio")
    caplog.set_level(logging.DEBUG, logger="botocore")
    errors: list[BaseException] = []

    proxy.configure(fault_rate=FAULT_RATE, faults=READ_FAULTS)
    faulty_store.put("big", payload(BIG))  # retries log at INFO
    assert faulty_store.get("big") == payload(BIG)
    failing: list[tuple[Fault, Callable[[], object]]] = [
        (Fault.SLOW_DOWN, lambda: faulty_store.get("k")),
        (Fault.ACCESS_DENIED, lambda: faulty_store.put("k", b"x")),
        (Fault.DROP, lambda: faulty_store.put("k", payload(BIG))),
    ]
    for kind, action in failing:
        proxy.configure(fault_rate=1.0, faults=[kind])
        with pytest.raises(StoreError) as caught:
            action()
        errors.append(caught.value)
    with S3Store("b-down", options=replace(faulty_options, endpoint_url=down_endpoint)) as down:
        with pytest.raises(StoreError) as unavailable:  # StoreUnavailable: test_down_endpoint_... checks the class
            down.size("k")
        errors.append(unavailable.value)

    assert proxy.total_injected > 0
    texts = [repr(faulty_store), repr(faulty_options), str(faulty_options), repr(faulty_options.retry)]
    for error in errors:
        texts += [str(error), repr(error), "".join(traceback.format_exception(error))]
        texts.append(str(pickle.loads(pickle.dumps(error))))
    trainio_records = [r for r in caplog.records if r.name.startswith("trainio")]
    assert trainio_records, "the retries should have been logged"
    assert any(r.name.startswith("botocore") for r in caplog.records), "botocore's DEBUG records were not captured"
    for record in caplog.records:
        assert SECRET_KEY not in record.getMessage(), f"{record.name} logged the secret key"
    for text in texts + [r.getMessage() for r in trainio_records]:
        assert SECRET_KEY not in text
        assert ACCESS_KEY not in text
