"""S3 provider errors: which are worth retrying, and what each means in trainio's terms.

Decisions are made by S3 error code and HTTP status, never by message text.
"""

from __future__ import annotations

import botocore.exceptions as bexc

from .errors import AlreadyExists, NotFound, StoreError

_RETRYABLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "BandwidthLimitExceeded",
    "PriorRequestNotComplete", "EC2ThrottledException", "OperationAborted",
})

_RETRYABLE_ERRORS = (
    bexc.HTTPClientError,  # connection reset/closed mid-request, read timeouts
    bexc.ConnectionError,  # botocore's own, not the builtin: refused (EndpointConnectionError), connect timeouts, proxy and SSL errors
    bexc.ResponseStreamingError,
    bexc.IncompleteReadError,
    bexc.ReadTimeoutError,
    ConnectionError,
    TimeoutError,
)


class ShortBody(Exception):
    """A response body ended before the bytes it announced; the request is worth retrying."""


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` ("" for anything else)."""
    if isinstance(exc, bexc.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def http_status(exc: BaseException) -> int:
    """The HTTP status of a botocore ``ClientError`` (0 for anything else)."""
    if isinstance(exc, bexc.ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed request may succeed if simply tried again."""
    if isinstance(exc, (ShortBody, *_RETRYABLE_ERRORS)):
        return True
    status = http_status(exc)
    return error_code(exc) in _RETRYABLE_CODES or status == 429 or status >= 500


def translate(exc: Exception, *, url: str, bucket: str, key: str, action: str, create_only: bool) -> StoreError:
    """The trainio error for a provider error that retrying will not fix, chosen by its S3 error code."""
    code, status = error_code(exc), http_status(exc)
    if code == "NoSuchBucket":
        return StoreError(url, key, f"cannot {action}: the bucket {bucket!r} does not exist",
                          "create it or fix the URL")
    if code in ("NoSuchKey", "NotFound", "404") or status == 404:
        return NotFound(url, key, f"cannot {action}: no such key")
    if create_only and (code == "PreconditionFailed" or status == 412):
        return AlreadyExists(url, key, f"cannot {action}: the key already exists (create-only write)")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken") or status == 403:
        return StoreError(url, key, f"cannot {action}: access denied ({code or status})",
                          "check the credentials and the bucket's policy")
    if isinstance(exc, bexc.NoCredentialsError):
        return StoreError(url, key, f"cannot {action}: no AWS credentials found",
                          "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or S3Options credentials")
    return StoreError(url, key, f"cannot {action}: {describe(exc)}")


def describe(exc: BaseException) -> str:
    """A short description of a provider error that never includes credentials."""
    code = error_code(exc)
    if code:
        message = exc.response.get("Error", {}).get("Message", "")  # type: ignore[attr-defined]
        return f"{code} (HTTP {http_status(exc)}){': ' + message if message else ''}"
    return f"{type(exc).__name__}: {exc}"
