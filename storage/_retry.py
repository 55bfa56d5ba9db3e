"""RetryPolicy: how often and how patiently a failed request is tried again."""

from __future__ import annotations

import random
from dataclasses import dataclass


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
