"""S3Base: what every S3Store operation stands on: the bucket and prefix, a boto3 client and a transfer pool
per process, and each request run under the retry policy with what finally fails translated."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
import botocore.config

from ._async import ProcessPool
from ._keys import check_prefix
from ._s3_errors import describe, is_retryable, translate
from ._s3_options import S3Options
from ._store import Store
from .errors import StoreError, StoreUnavailable

T = TypeVar("T")
log = logging.getLogger("trainio.storage.s3")

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

# One boto3 session per process and set of credentials, shared by every store: a new session parses botocore's
# endpoint and service data again (0.1-0.2 s of CPU on the 2-vCPU test VM, in each new dataset's first epoch).
# Sessions are not thread-safe, so clients are made from them under the lock.
_sessions: dict[tuple[object, ...], boto3.session.Session] = {}
_sessions_lock = threading.Lock()


def _after_fork() -> None:
    global _sessions_lock
    _sessions_lock = threading.Lock()  # a thread of the parent may have held it at the fork
    _sessions.clear()


os.register_at_fork(after_in_child=_after_fork)


def _new_client(options: S3Options, config: botocore.config.Config) -> Any:
    """An S3 client for ``options``, made from this process's session for its credentials."""
    key = (options.access_key_id, options.secret_access_key, options.session_token, options.region,
           options.profile)
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = _sessions[key] = boto3.session.Session(
                aws_access_key_id=options.access_key_id,
                aws_secret_access_key=options.secret_access_key,
                aws_session_token=options.session_token,
                region_name=options.region,
                profile_name=options.profile,
            )
        return session.client("s3", endpoint_url=options.endpoint_url, config=config)


class S3Base(Store):
    """Keys as objects ``<prefix>/<key>`` in ``bucket``; the operations are :class:`~trainio.storage.S3Store`'s."""

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
        self._transfers = ProcessPool(options.max_concurrency, "trainio-s3")  # the parts of one transfer
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
        return (*super()._transient_attributes(), "_client_obj", "_s3_pid", "_s3_lock")

    def _reset_transient(self) -> None:
        super()._reset_transient()
        self._reset_s3_transient()

    def _reset_s3_transient(self) -> None:
        self._client_obj: Any = None
        self._s3_pid = 0
        self._s3_lock = threading.Lock()

    def close(self) -> None:
        super().close()
        with self._s3_lock:
            self._s3_pid = 0
        self._transfers.shutdown()
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
            config = botocore.config.Config(
                max_pool_connections=2 * opts.max_concurrency + 2,
                connect_timeout=opts.connect_timeout_s,
                read_timeout=opts.read_timeout_s,
                retries={"total_max_attempts": 1},
                tcp_keepalive=True,
            )
            self._client_obj = _new_client(opts, config)
            self._s3_pid = pid

    @property
    def _client(self) -> Any:
        self._ensure_process_resources()
        return self._client_obj

    def _transfer_pool(self) -> ThreadPoolExecutor:
        """The pool that runs the parts of one transfer (the base class's pool runs the async twins)."""
        return self._transfers.executor()

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
