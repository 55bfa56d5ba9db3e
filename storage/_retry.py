"""Bounded retries with jittered exponential backoff, and the test of what is worth retrying."""

from __future__ import annotations

import random
from dataclasses import dataclass

import botocore.exceptions as bexc

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


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently a request is retried.

    A request is tried at most ``max_attempts`` times. Before try ``n + 1`` it
    waits a uniformly random time in ``[0, min(max_backoff_s,
    initial_backoff_s * 2**n))`` ("full jitter"), so the worst case of the
    defaults is about 3 s of waiting in all. Throttling, 5xx answers, timeouts,
    refused or dropped connections and bodies cut short are retried; other
    errors are not.
    """

    max_attempts: int = 6
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts={self.max_attempts}: must be >= 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"RetryPolicy: need 0 <= initial_backoff_s ({self.initial_backoff_s}) "
                f"<= max_backoff_s ({self.max_backoff_s})"
            )

    def backoff_s(self, failures: int) -> float:
        """How long to wait after ``failures`` failed tries (>= 1)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * (2 ** (failures - 1)))
        return random.uniform(0.0, ceiling)


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
