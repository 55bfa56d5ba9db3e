"""S3Store: keys as objects in an S3 bucket (AWS or any S3-compatible endpoint), through boto3."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import mmap
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from functools import partial
from typing import Any, TypeVar

import botocore.exceptions as bexc

from ._buffers import new_bytes
from ._hashing import Hasher
from ._keys import TEMP_MARKER, check_bounds, check_key
from ._local_io import pwrite_all
from ._parallel import run_all
from ._s3_base import S3Base
from ._s3_errors import ShortBody, describe, error_code, http_status
from ._streams import HashingReader, HashingWriter
from .errors import AlreadyExists, InvalidKey, StoreError

T = TypeVar("T")
log = logging.getLogger("trainio.storage.s3")

_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_DELETE_BATCH = 1000
_MAX_PARTS = 10_000
_BODY_READ_BYTES = 1 << 20  # a response body is read this much per call: urllib3 copies each call's bytes out of a
#                             new buffer of that size, and fresh pages cost more to zero than the copy (16 MiB
#                             parts read whole took the kernel's page zeroing to 2/3 of a download's CPU)


class S3Store(S3Base):
    """Keys as objects ``<prefix>/<key>`` in ``bucket``.

    Large objects move in parallel parts: multipart uploads (aborted on
    failure, so no partial object ever appears) and ranged GETs written
    straight into the destination buffer. Every request is retried under
    ``options.retry``; what still fails raises ``StoreUnavailable`` naming
    the endpoint, the bucket and the key.
    """

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
            body = self._range_body(key, offset, offset + view.nbytes)
            filled = 0
            while filled < view.nbytes:  # in pieces: urllib3 reads each call into a new buffer of its size
                n = body.readinto(view[filled:filled + _BODY_READ_BYTES])
                if not n:
                    raise ShortBody()
                filled += n
            body.close()

        self._call("read", key, attempt)

    def _read_range_to(self, key: str, fd: int, start: int, stop: int) -> None:
        """Write bytes [start, stop) of ``key`` at the same offsets of the file ``fd``; retried as a whole."""

        def attempt() -> None:
            body = self._range_body(key, start, stop)
            position = start
            while position < stop:
                chunk = body.read(min(_BODY_READ_BYTES, stop - position))
                if not chunk:
                    raise ShortBody()
                position += pwrite_all(fd, chunk, position)
            body.close()

        self._call("read", key, attempt)

    def _range_body(self, key: str, start: int, stop: int) -> Any:
        """The open body of a GET of bytes [start, stop) of ``key``, positioned at ``start``."""
        response = self._get_range(key, start, stop)
        if response is None:
            check_bounds(self.url, key, start, stop, self._size(key))
            raise StoreError(self.url, key, f"the endpoint refused the range [{start}, {stop})")
        total, skip = _content_range(response, start)
        check_bounds(self.url, key, start, stop, total)
        body = response["Body"]
        if skip:
            body.read(skip)
        return body

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

    def _read_stream(self, key: str, sink: HashingWriter, size: int | None) -> None:
        if fcntl.fcntl(sink.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR:
            self._read_in_place(key, sink.fileno(), sink.hasher, size)
            return
        part = self._options.part_size_bytes
        start, total = self._stream_start(key, size, sink.write)
        # A sliding window of parts in flight, each landing in one of a fixed set of reused buffers.
        free = [memoryview(bytearray(part)) for _ in range(min(self._options.max_concurrency,
                                                                -(-(total - start) // part)))]

        def fetch(offset: int, buffer: memoryview) -> memoryview:
            view = buffer[: min(part, total - offset)]
            self._read_range_into(key, view, offset)
            return view

        pending: deque[tuple[Future[memoryview], memoryview]] = deque()
        try:
            for offset in range(start, total, part):
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

    def _stream_start(self, key: str, size: int | None, write_first: Callable[[bytes], object]) -> tuple[int, int]:
        """Where a whole-key read goes on, and its total size: with ``size`` unknown, the first part and the size
        come in one request, and the part goes to ``write_first``."""
        if size is not None:
            return 0, size
        first, total = self._read_head(key, 0, self._options.part_size_bytes)
        write_first(first)
        return len(first), total

    def _read_in_place(self, key: str, fd: int, hasher: Hasher, size: int | None) -> None:
        """Each part written at its offset of the file ``fd`` as it arrives, then all hashed read back.

        Unlike the in-order stream, no part waits in a buffer of its own for
        the parts before it, and no such buffer is allocated (zeroing new
        buffers had cost as much CPU as the download's copies).
        """
        part = self._options.part_size_bytes
        start, total = self._stream_start(key, size, lambda first: pwrite_all(fd, first, 0))
        jobs = (partial(self._read_range_to, key, fd, pos, min(pos + part, total)) for pos in range(start, total, part))
        run_all(self._transfer_pool(), jobs, self._options.max_concurrency)
        if total:
            with mmap.mmap(fd, total, access=mmap.ACCESS_READ) as mapped:
                hasher.update(mapped)

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
