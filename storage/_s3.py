"""S3Store: keys as objects in an S3 bucket (AWS or any S3-compatible endpoint), through boto3."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions as bexc

from ._buffers import new_bytes
from ._keys import TEMP_MARKER, check_bounds, check_key, check_prefix
from ._parallel import run_all
from ._s3_errors import ShortBody, describe, error_code, http_status, is_retryable, translate
from ._s3_options import S3Options
from ._store import Store
from ._streams import HashingReader, HashingWriter
from .errors import AlreadyExists, InvalidKey, StoreError, StoreUnavailable

T = TypeVar("T")
log = logging.getLogger("trainio.storage.s3")

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_DELETE_BATCH = 1000
_MAX_PARTS = 10_000


class S3Store(Store):
    """Keys as objects ``<prefix>/<key>`` in ``bucket``.

    Large objects move in parallel parts: multipart uploads (aborted on
    failure, so no partial object ever appears) and ranged GETs written
    straight into the destination buffer. Every request is retried under
    ``options.retry``; what still fails raises ``StoreUnavailable`` naming
    the endpoint, the bucket and the key.
    """

    def __init__(self, bucket: str, prefix: str = "", *, options: S3Options = S3Options()) -> None:
        super().__init__(io_threads=options.max_concurrency)
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._options = options
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise StoreError(
                self.url, "", f"{bucket!r} is not a valid bucket name",
                "use 3-63 lowercase letters, digits, '.' or '-', starting and ending with a letter or digit",
            )
        check_prefix(self.url, self._prefix)
        self._reset_s3_transient()

    @property
    def url(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"

    @property
    def bucket(self) -> str:
        """The bucket holding the objects."""
        return self._bucket

    @property
    def prefix(self) -> str:
        """The key prefix inside the bucket ("" for the whole bucket)."""
        return self._prefix

    @property
    def options(self) -> S3Options:
        """The options this store was made with."""
        return self._options

    def _identity(self) -> tuple[object, ...]:
        return (self._bucket, self._prefix, self._options)

    def _transient_attributes(self) -> tuple[str, ...]:
        return (*super()._transient_attributes(), "_client_obj", "_transfers", "_s3_pid", "_s3_lock")

    def _reset_transient(self) -> None:
        super()._reset_transient()
        self._reset_s3_transient()

    def _reset_s3_transient(self) -> None:
        self._client_obj: Any = None
        self._transfers: ThreadPoolExecutor | None = None
        self._s3_pid = 0
        self._s3_lock = threading.Lock()

    def close(self) -> None:
        super().close()
        with self._s3_lock:
            self._s3_pid = 0
        transfers, self._transfers = self._transfers, None
        if transfers is not None:
            transfers.shutdown(wait=True)
        client, self._client_obj = self._client_obj, None
        if client is not None:
            client.close()

    # -- per-process resources ---------------------------------------------------

    def _ensure_process_resources(self) -> None:
        pid = os.getpid()
        if self._s3_pid == pid:
            return
        with self._s3_lock:
            if self._s3_pid == pid:
                return
            opts = self._options
            session = boto3.session.Session(
                aws_access_key_id=opts.access_key_id,
                aws_secret_access_key=opts.secret_access_key,
                aws_session_token=opts.session_token,
                region_name=opts.region,
                profile_name=opts.profile,
            )
            config = botocore.config.Config(
                max_pool_connections=2 * opts.max_concurrency + 2,
                connect_timeout=opts.connect_timeout_s,
                read_timeout=opts.read_timeout_s,
                retries={"total_max_attempts": 1},
                tcp_keepalive=True,
            )
            self._client_obj = session.client("s3", endpoint_url=opts.endpoint_url, config=config)
            self._transfers = ThreadPoolExecutor(opts.max_concurrency, thread_name_prefix="trainio-s3")
            self._s3_pid = pid

    @property
    def _client(self) -> Any:
        self._ensure_process_resources()
        return self._client_obj

    def _transfer_pool(self) -> ThreadPoolExecutor:
        """The pool that runs the parts of one transfer (the base class's pool runs the async twins)."""
        self._ensure_process_resources()
        assert self._transfers is not None
        return self._transfers

    def _endpoint(self) -> str:
        try:
            return str(self._client.meta.endpoint_url)
        except Exception:  # noqa: BLE001 - only for an error message
            return self._options.endpoint_url or "the default AWS endpoint"

    def _full(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    # -- retries and error translation -----------------------------------------

    def _call(self, action: str, key: str, fn: Callable[[], T], *, create_only: bool = False) -> T:
        """Run one request under the retry policy, translating what finally fails."""
        failures = 0
        while True:
            try:
                return fn()
            except (StoreError, ValueError, TypeError):
                raise
            except Exception as exc:
                if not is_retryable(exc):
                    raise translate(exc, url=self.url, bucket=self._bucket, key=key, action=action,
                                create_only=create_only) from exc
                failures += 1
                if failures >= self._options.retry.max_attempts:
                    raise StoreUnavailable(
                        self.url, key,
                        f"cannot {action}: {failures} tries against endpoint {self._endpoint()} "
                        f"failed; last error: {describe(exc)}",
                        "check that the endpoint is up and reachable, or raise S3Options.retry",
                    ) from exc
                delay = self._options.retry.backoff_s(failures)
                log.info("[key=%s] %s failed (%s); retry %d in %.2fs", self._full(key), action,
                         describe(exc), failures, delay)
                time.sleep(delay)

    def _size(self, key: str) -> int:
        response = self._call("stat", key, lambda: self._client.head_object(Bucket=self._bucket, Key=self._full(key)))
        return int(response["ContentLength"])

    def _modified(self, key: str) -> float:
        response = self._call("stat", key, lambda: self._client.head_object(Bucket=self._bucket, Key=self._full(key)))
        return float(response["LastModified"].timestamp())

    def _get_range(self, key: str, start: int, stop: int) -> Any:
        """GET bytes [start, stop) (stop > start); the response, or None if the range is unsatisfiable."""
        try:
            return self._client.get_object(Bucket=self._bucket, Key=self._full(key), Range=f"bytes={start}-{stop - 1}")
        except bexc.ClientError as exc:
            if error_code(exc) == "InvalidRange" or http_status(exc) == 416:
                return None
            raise

    def _read_head(self, key: str, start: int, want: int) -> tuple[bytes, int]:
        """Up to ``want`` bytes from ``start`` and the object's total size, in one request."""

        def attempt() -> tuple[bytes, int]:
            response = self._get_range(key, start, start + want)
            if response is None:
                size = self._size(key)
                check_bounds(self.url, key, start, None, size)
                return b"", size
            total, first = _content_range(response, start)
            data = response["Body"].read()
            if len(data) != int(response["ContentLength"]):
                raise ShortBody()
            return data[first:first + want] if first else data, total

        return self._call("read", key, attempt)

    def _read_range_into(self, key: str, view: memoryview, offset: int) -> None:
        """Fill ``view`` with bytes [offset, offset + len(view)); retried as a whole."""

        def attempt() -> None:
            stop = offset + view.nbytes
            response = self._get_range(key, offset, stop)
            if response is None:
                check_bounds(self.url, key, offset, stop, self._size(key))
                raise StoreError(self.url, key, f"the endpoint refused the range [{offset}, {stop})")
            total, skip = _content_range(response, offset)
            check_bounds(self.url, key, offset, stop, total)
            body = response["Body"]
            if skip:
                body.read(skip)
            filled = 0
            while filled < view.nbytes:
                n = body.readinto(view[filled:])
                if not n:
                    raise ShortBody()
                filled += n
            body.close()

        self._call("read", key, attempt)

    def _parallel_into(self, key: str, view: memoryview, offset: int) -> None:
        part = self._options.part_size_bytes
        if view.nbytes <= part:
            self._read_range_into(key, view, offset)
            return
        jobs = (
            partial(self._read_range_into, key, view[pos:pos + part], offset + pos)
            for pos in range(0, view.nbytes, part)
        )
        run_all(self._transfer_pool(), jobs, self._options.max_concurrency)

    def _get(self, key: str, start: int, end: int | None) -> bytes:
        if end == start:
            check_bounds(self.url, key, start, end, self._size(key))
            return b""
        part = self._options.part_size_bytes
        head, total = self._read_head(key, start, part if end is None else min(part, end - start))
        stop = check_bounds(self.url, key, start, end, total)
        if start + len(head) >= stop:
            return head
        result, view = new_bytes(stop - start)
        view[: len(head)] = head
        self._parallel_into(key, view[len(head):], start + len(head))
        return result

    def _get_into(self, key: str, buffer: memoryview, offset: int) -> None:
        if buffer.nbytes == 0:
            check_bounds(self.url, key, offset, offset, self._size(key))
            return
        self._parallel_into(key, buffer, offset)

    def _read_stream(self, key: str, sink: HashingWriter) -> None:
        part = self._options.part_size_bytes
        first, total = self._read_head(key, 0, part)
        sink.write(first)
        # A sliding window of parts in flight, each landing in one of a fixed set of reused buffers.
        free = [memoryview(bytearray(part)) for _ in range(min(self._options.max_concurrency,
                                                                -(-(total - len(first)) // part)))]

        def fetch(offset: int, buffer: memoryview) -> memoryview:
            view = buffer[: min(part, total - offset)]
            self._read_range_into(key, view, offset)
            return view

        pending: deque[tuple[Future[memoryview], memoryview]] = deque()
        try:
            for offset in range(len(first), total, part):
                if not free:
                    done, buffer = pending.popleft()
                    sink.write(done.result())
                    free.append(buffer)
                buffer = free.pop()
                pending.append((self._transfer_pool().submit(fetch, offset, buffer), buffer))
            while pending:
                done, buffer = pending.popleft()
                sink.write(done.result())
        finally:
            for future, _ in pending:
                future.cancel()
            wait([future for future, _ in pending])

    # -- writes ------------------------------------------------------------------

    def _put(self, key: str, data: memoryview, overwrite: bool) -> None:
        part = self._options.part_size_bytes
        if data.nbytes < self._options.multipart_threshold_bytes:
            source = data.obj
            body = source if isinstance(source, bytes) and len(source) == data.nbytes else bytes(data)
            self._put_object(key, body, overwrite)
            return
        bodies = (bytes(data[pos:pos + part]) for pos in range(0, data.nbytes, part))
        self._multipart(key, (partial(self._upload_part, key, body) for body in bodies), overwrite)

    def _write_stream(self, key: str, source: HashingReader, size: int, overwrite: bool) -> None:
        if size < self._options.multipart_threshold_bytes:
            buffer = bytearray(size)
            n = source.readinto(memoryview(buffer)) if size else 0
            if n != size or source.readinto(memoryview(bytearray(1))):
                raise StoreError(self.url, key, "the source file changed size while it was being uploaded")
            self._put_object(key, bytes(buffer), overwrite)
            return

        def bodies() -> Iterator[bytearray]:
            part = max(self._options.part_size_bytes, -(-size // _MAX_PARTS))
            while True:
                buffer = bytearray(part)
                n = source.readinto(memoryview(buffer))
                if not n:
                    return
                del buffer[n:]
                yield buffer

        self._multipart(key, (partial(self._upload_part, key, body) for body in bodies()), overwrite)

    def _put_object(self, key: str, body: bytes, overwrite: bool) -> None:
        extra = {} if overwrite else {"IfNoneMatch": "*"}
        tries = 0

        def attempt() -> object:
            nonlocal tries
            tries += 1
            return self._client.put_object(Bucket=self._bucket, Key=self._full(key), Body=body, **extra)

        try:
            self._call("write", key, attempt, create_only=not overwrite)
        except AlreadyExists:
            if tries == 1:
                raise
            # A retried create may meet its own earlier write whose answer was lost: same bytes, same ETag.
            head = self._call("stat", key, lambda: self._client.head_object(Bucket=self._bucket, Key=self._full(key)))
            if head["ETag"].strip('"') != hashlib.md5(body, usedforsecurity=False).hexdigest():
                raise

    def _upload_part(self, key: str, body: bytes | bytearray, number: int, upload_id: str) -> str:
        response = self._call("upload a part", key, lambda: self._client.upload_part(
            Bucket=self._bucket, Key=self._full(key), UploadId=upload_id, PartNumber=number, Body=body))
        return str(response["ETag"])

    def _copy_part(self, src: str, dst: str, start: int, stop: int, number: int, upload_id: str) -> str:
        response = self._call("copy a part", dst, lambda: self._client.upload_part_copy(
            Bucket=self._bucket, Key=self._full(dst), UploadId=upload_id, PartNumber=number,
            CopySource={"Bucket": self._bucket, "Key": self._full(src)},
            CopySourceRange=f"bytes={start}-{stop - 1}"))
        return str(response["CopyPartResult"]["ETag"])

    def _multipart(self, key: str, jobs: Iterator[Callable[[int, str], str]], overwrite: bool) -> None:
        """Run part jobs ``job(part_number, upload_id) -> etag`` in parallel, then complete; abort on any failure."""
        full = self._full(key)
        upload_id = self._call("start an upload", key,
                               lambda: self._client.create_multipart_upload(Bucket=self._bucket, Key=full))["UploadId"]
        try:
            numbered = (partial(job, number, upload_id) for number, job in enumerate(jobs, 1))
            etags = run_all(self._transfer_pool(), numbered, self._options.max_concurrency)
            parts = [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]
            extra = {} if overwrite else {"IfNoneMatch": "*"}
            tries = 0

            def complete() -> object:
                nonlocal tries
                tries += 1
                return self._client.complete_multipart_upload(
                    Bucket=self._bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}, **extra)

            try:
                self._call("complete an upload", key, complete, create_only=not overwrite)
            except AlreadyExists:
                if tries == 1:
                    raise
                # A retried complete may meet its own earlier completion whose answer was lost.
                head = self._call("stat", key, lambda: self._client.head_object(Bucket=self._bucket, Key=full))
                if head["ETag"].strip('"') != _multipart_etag(etags):
                    raise
        except BaseException:
            try:
                self._call("abort an upload", key, lambda: self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=full, UploadId=upload_id))
            except Exception as abort_exc:  # noqa: BLE001 - the original error matters more
                log.warning("[key=%s] could not abort multipart upload: %s", full, describe(abort_exc))
            raise

    # -- listing, deletion, copies -------------------------------------------------

    def _list(self, prefix: str) -> list[str]:
        base = f"{self._prefix}/" if self._prefix else ""
        search = f"{base}{prefix}/" if prefix else base

        def attempt() -> list[str]:
            keys: list[str] = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self._bucket, Prefix=search):
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(base):]
                    try:
                        keys.append(check_key(self.url, key))
                    except InvalidKey:
                        log.warning("[key=%s] skipping an object whose name is not a valid key", obj["Key"])
            return keys

        return self._call("list", prefix, attempt)

    def _list_dirs(self, prefix: str) -> list[str]:
        base = f"{self._prefix}/" if self._prefix else ""
        search = f"{base}{prefix}/" if prefix else base

        def attempt() -> list[str]:
            names: list[str] = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self._bucket, Prefix=search, Delimiter="/"):
                for common in page.get("CommonPrefixes", ()):
                    name = common["Prefix"][len(search):].rstrip("/")
                    if name and not name.startswith(TEMP_MARKER):
                        names.append(name)
            return names

        return self._call("list", prefix, attempt)

    def _delete(self, key: str) -> None:
        self._call("delete", key, lambda: self._client.delete_object(Bucket=self._bucket, Key=self._full(key)))

    def _delete_prefix(self, prefix: str) -> int:
        keys = self._list(prefix)
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": self._full(k)} for k in keys[i:i + _DELETE_BATCH]]
            response = self._call("delete", prefix, functools.partial(
                self._client.delete_objects, Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True}))
            errors = response.get("Errors", ())
            if errors:
                first = errors[0]
                raise StoreError(self.url, first.get("Key", prefix),
                                 f"cannot delete: {first.get('Code')}: {first.get('Message')}")
        return len(keys)

    def _copy(self, src: str, dst: str) -> None:
        size = self._size(src)
        if size < self._options.multipart_threshold_bytes:
            source = {"Bucket": self._bucket, "Key": self._full(src)}
            self._call("copy", dst, lambda: self._client.copy_object(
                Bucket=self._bucket, Key=self._full(dst), CopySource=source))
            return
        part = max(self._options.part_size_bytes, -(-size // _MAX_PARTS))
        jobs = (partial(self._copy_part, src, dst, pos, min(pos + part, size)) for pos in range(0, size, part))
        self._multipart(dst, jobs, True)


def _content_range(response: dict[str, Any], start: int) -> tuple[int, int]:
    """The object's total size, and how many leading body bytes precede ``start``."""
    header = response.get("ContentRange")
    if header:
        match = _CONTENT_RANGE_RE.match(header)
        if match and match.group(3) != "*":
            return int(match.group(3)), int(match.group(1)) - start
    # The endpoint ignored the Range header and sent the whole object.
    return int(response["ContentLength"]), start


def _multipart_etag(etags: list[str]) -> str:
    """The ETag S3 gives an object completed from parts with these ETags: MD5 of their MD5s, then "-<count>"."""
    try:
        joined = b"".join(bytes.fromhex(etag.strip('"')) for etag in etags)
    except ValueError:  # not plain MD5s (SSE-KMS, say): nothing to compare
        return ""
    return f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(etags)}"
