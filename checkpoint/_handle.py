"""What a save returns: a handle on the step's progress through the tiers."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Literal

from trainio.storage import CheckpointError

Status = Literal["pending", "committed", "skipped", "failed"]


@dataclass(frozen=True)
class TierResult:
    """The fate of one step on one tier.

    Attributes:
        status: ``pending``; ``committed``; ``skipped`` (the tier's retention
            does not keep this step, so it is not copied there); or ``failed``.
        error: Why it failed ("" otherwise).
        seconds: Time from the save call to the commit on this tier.
        nbytes: Bytes of the step's files.
    """

    status: Status
    error: str = ""
    seconds: float = 0.0
    nbytes: int = 0


class SaveHandle:
    """A step being saved: wait for it, poll it, read how each tier fared.

    ``wait``/``done`` concern the first tier, where the step becomes
    restorable; ``result`` waits for every tier, promotions included.
    """

    def __init__(self, step: int, tiers: list[str]) -> None:
        self.step = step
        self._start = time.perf_counter()
        self._results: dict[str, TierResult] = {label: TierResult("pending") for label in tiers}
        self._first = tiers[0]
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self.reported = False
        self.blocked_s = 0.0
        """Seconds ``save`` held the caller (snapshot, and waiting for a free staging slot)."""

    def _set(self, tier: str, result: TierResult, error: BaseException | None = None) -> None:
        with self._cond:
            if result.status == "committed":
                result = TierResult("committed", seconds=time.perf_counter() - self._start, nbytes=result.nbytes)
            self._results[tier] = result
            if tier == self._first and error is not None:
                self._error = error
            self._cond.notify_all()

    def _settle_rest(self, status: Status, error: str = "") -> None:
        """Give every still-pending tier the final ``status``."""
        with self._cond:
            for label, result in self._results.items():
                if result.status == "pending":
                    self._results[label] = TierResult(status, error)
            self._cond.notify_all()

    def tier_status(self, tier: str) -> Status:
        """The status of the step on ``tier`` now."""
        with self._cond:
            return self._results[tier].status

    def done(self) -> bool:
        """Whether the first tier has committed the step or failed to."""
        with self._cond:
            return self._results[self._first].status != "pending"

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the step is committed on the first tier.

        Raises:
            CheckpointError: the save failed (the message says why and where),
                or ``timeout`` seconds passed first.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._results[self._first].status != "pending", timeout):
                raise CheckpointError(f"step {self.step}: not committed after {timeout} s")
            if self._error is not None:
                self.reported = True
                raise CheckpointError(f"step {self.step} was not saved to {self._first}: "
                                      f"{self._results[self._first].error}") from self._error

    def result(self, timeout: float | None = None) -> dict[str, TierResult]:
        """Every tier's result, once none is pending (promotions included).

        Raises:
            CheckpointError: the first tier failed, or ``timeout`` passed.
        """
        self.wait(timeout)
        with self._cond:
            if not self._cond.wait_for(
                    lambda: all(r.status != "pending" for r in self._results.values()), timeout):
                raise CheckpointError(f"step {self.step}: promotion still running after {timeout} s")
            return dict(self._results)

    def __repr__(self) -> str:
        with self._cond:
            states = ", ".join(f"{k}={v.status}" for k, v in self._results.items())
        return f"SaveHandle(step={self.step}, {states})"


KEEP_HANDLES = 256
"""How many recent saves' handles a manager keeps, to report their promotions."""


class SaveLedger:
    """The handles of a manager's recent saves and its failures not yet raised: the one way to complete a handle.

    Thread-safe: the trainer's thread opens handles, the background
    threads record what happened to them.
    """

    def __init__(self, tiers: list[str]) -> None:
        self._tiers = tiers
        self._lock = threading.Lock()
        self._handles: dict[int, SaveHandle] = {}
        self._failures: list[tuple[SaveHandle | None, CheckpointError]] = []

    def open(self, step: int) -> SaveHandle:
        """A new handle for ``step`` (the oldest kept handles are forgotten past :data:`KEEP_HANDLES`)."""
        handle = SaveHandle(step, self._tiers)
        with self._lock:
            self._handles[step] = handle
            while len(self._handles) > KEEP_HANDLES:
                self._handles.pop(next(iter(self._handles)))
        return handle

    def record(self, step_or_handle: int | SaveHandle, tier: str, result: TierResult,
               error: BaseException | None = None) -> None:
        """Set one tier's result of a save (nothing when the step's handle is no longer kept)."""
        handle = step_or_handle if isinstance(step_or_handle, SaveHandle) else self._handles.get(step_or_handle)
        if handle is not None:
            handle._set(tier, result, error)

    def settle(self, handle: SaveHandle, status: Status, why: str = "") -> None:
        """Give every tier of ``handle`` still pending the final ``status``."""
        handle._settle_rest(status, why)

    def settle_tier(self, tier: str, status: Status, why: str = "", up_to: int | None = None) -> None:
        """Give ``tier``'s result of every finished save (of a step up to ``up_to``) still pending there ``status``.

        A pass that decided which steps a tier wants settles only the steps it
        saw: a save committed meanwhile waits for the pass that sees it.
        """
        with self._lock:
            handles = list(self._handles.values())
        for handle in handles:
            if up_to is not None and handle.step > up_to:
                continue
            if handle.tier_status(tier) == "pending" and handle.done():
                handle._set(tier, TierResult(status, why))

    def fail(self, handle: SaveHandle | None, error: CheckpointError) -> None:
        """Remember ``error`` to raise from the next call that reports failures (unless ``handle`` raised it)."""
        with self._lock:
            self._failures.append((handle, error))

    def raise_unreported(self) -> None:
        """Raise the failures no handle's ``wait`` raised yet (the first, naming the others), then forget them."""
        with self._lock:
            failures = [e for h, e in self._failures if h is None or not h.reported]
            self._failures.clear()
        if len(failures) > 1:
            raise CheckpointError(f"{failures[0]} (and {len(failures) - 1} more failure(s): "
                                  + "; ".join(str(e) for e in failures[1:]) + ")") from failures[0].__cause__
        if failures:
            raise failures[0]
