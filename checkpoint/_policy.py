"""SavePolicy: when a job should save (an interval, a preemption notice every rank agrees on), and what it may."""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import threading
import time
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

from trainio.storage import CheckpointError, StoreUnavailable, TrainioError

from ._tiers.commit import TierIO, describe

log = logging.getLogger("trainio.checkpoint")
_MAIN_THREAD_WAIT_S = 2.0

if TYPE_CHECKING:
    from ._options import CheckpointOptions
    from ._save.collective import Exchange
    from ._tier import Tier
    from ._tiers.tier_set import TierSet


class SavePolicy:
    """What :class:`CheckpointManager` adds to saving: :meth:`should_save`, :attr:`preempted`, and the refusal of
    saves that would go back in time or into a read-only manager."""

    options: CheckpointOptions
    tiers: list[Tier]
    _tierset: TierSet
    _io: list[TierIO]

    def _start_policy(self, exchange: Exchange) -> None:
        """Check that every tier can be written (unless read-only) and catch SIGTERM if asked to.

        Shared tiers are checked by rank 0 and a node tier by every rank;
        every rank raises if any check failed.

        Raises:
            CheckpointError: a tier cannot be written, naming it and why.
            ValueError: ``save_on_preemption`` outside the main thread.
        """
        if not self.options.read_only:
            problems = [_unwritable(io) for tier, io in zip(self.tiers, self._io)
                        if exchange.rank == 0 or tier.node_scoped]
            found = [p for p in problems if p is not None]
            everyone = exchange.all_gather("checking that the tiers can be written", found[:1]) \
                if exchange.world > 1 else [found[:1]]
            for problem in (p for rank_problems in everyone for p in rank_problems):
                raise CheckpointError(problem)
        self._exchange_of_policy = exchange
        self._newest_step: int | None = None  # the newest step committed or being saved (rank 0), listed once
        self._notice: float | None = None  # when SIGTERM came
        self._grace_over = False
        self._preempted = False
        self._previous_handler: Any = None
        if self.options.save_on_preemption:
            if threading.current_thread() is not threading.main_thread():
                raise ValueError("save_on_preemption: make the CheckpointManager in the main thread (only it may "
                                 "catch SIGTERM)")
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _stop_policy(self) -> None:
        """Give SIGTERM back to the handler it had before (the manager is closing)."""
        if self.options.save_on_preemption and threading.current_thread() is threading.main_thread():
            previous = self._previous_handler
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._grace_over:  # sent by the timer below: the job had its time
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self._notice is None:
            self._notice = time.monotonic()
            log.warning("SIGTERM: the next step every rank reaches is saved; the job has %.0f s to leave",
                        self.options.preemption_grace_s)
            grace = threading.Timer(self.options.preemption_grace_s, self._end_job)
            grace.daemon = True
            grace.start()

    def _end_job(self) -> None:
        """The grace period passed without the job leaving: end it as SIGTERM would have (through the main thread,
        the only one that may restore the default handler; at once if it does not answer)."""
        self._grace_over = True
        log.error("the grace period after SIGTERM (%.0f s) is over and the job has not left: ending it",
                  self.options.preemption_grace_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(_MAIN_THREAD_WAIT_S)
        os._exit(128 + signal.SIGTERM)

    @property
    def preempted(self) -> bool:
        """Whether a preemption notice (SIGTERM, on any rank) was agreed on by :meth:`should_save`: save, then leave."""
        return self._preempted

    def should_save(self, step: int) -> bool:
        """Whether to save at ``step``: a multiple of ``save_interval_steps``, or the first step every rank checks
        after any rank was sent SIGTERM (with ``save_on_preemption``). Call it at every step on every rank: the
        ranks agree on the answer (one small collective a call in a multi-rank job)."""
        noticed = int(self._notice is not None)
        if self.options.save_on_preemption and self._exchange_of_policy.world > 1:
            noticed = self._exchange_of_policy.most(f"should_save({step}): was any rank preempted", noticed)
        if noticed and not self._preempted:
            self._preempted = True
            return True
        interval = self.options.save_interval_steps
        return interval is not None and step % interval == 0

    def _check_writes(self, what: str) -> None:
        """Raise :class:`CheckpointError` if this manager is read-only."""
        if self.options.read_only:
            raise CheckpointError(f"this CheckpointManager is read-only (read_only=True): it does not {what}")

    def _refusal(self, step: int, rollback: bool, metrics: Mapping[str, float] | None = None) -> CheckpointError | None:
        """Why ``save(step)`` must not happen: a read-only manager, metrics that are not names and finite numbers,
        or a step older than the newest committed one (unless ``rollback``, a deliberate return after a loss spike,
        say; checked on rank 0)."""
        if self.options.read_only:
            return CheckpointError("this CheckpointManager is read-only (read_only=True): it does not save")
        if not isinstance(metrics, Mapping | None) or any(
                not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                for k, v in (metrics or {}).items()):
            return CheckpointError(f"save(metrics=...) takes names and finite numbers; not {metrics!r}")
        if self._exchange_of_policy.rank != 0:
            return None
        if self._newest_step is None:
            self._newest_step = max([_newest(io) for io in self._io], default=-1)
        if step < self._newest_step and not rollback:
            return CheckpointError(f"step {step} is older than step {self._newest_step}, the newest committed: "
                                   "saving it would make an older state the latest; pass save(..., rollback=True) "
                                   "if that is meant")
        self._newest_step = step if rollback else max(self._newest_step, step)
        return None


def _newest(io: TierIO) -> int:
    """The newest step committed on a tier (-1 for none, or for a tier that is down: it cannot be read either)."""
    try:
        return max(io.steps(), default=-1)
    except StoreUnavailable:
        return -1


def _unwritable(io: TierIO) -> str | None:
    """Why the tier cannot be written (a file in the way, no permission, a missing bucket), found by writing and
    deleting a small file; None if it can. A tier that is down for now (an S3 outage) is only logged: saves wait
    for it and promotions retry, as they would have."""
    probe = f"trainio-write-check-{secrets.token_hex(6)}"
    try:
        io.store.put(probe, b"")
        io.store.delete(probe)
    except StoreUnavailable as exc:
        log.warning("%s: could not check that the tier can be written: %s", io.label, describe(exc))
    except (OSError, TrainioError) as exc:
        return (f"{io.label}: the tier cannot be written ({describe(exc)}): fix its path or permissions, or open "
                "the manager with read_only=True to only restore")
    return None
