"""When a manager promotes: after each commit, in a thread of its own, and on demand."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ._node_job import NodeJob
from ._threads import background_pool
from ._tiers.commit import TierIO
from ._tiers.tier_set import TierSet


class Promotions:
    """Runs a manager's promotions one at a time in the background.

    From shared tiers, rank 0 copies, and requests made while one is queued
    join it. From a node tier every rank uploads its own part, so each rank
    runs exactly one promotion per committed step, in commit order.
    """

    def __init__(self, tierset: TierSet, io: list[TierIO], nodes: NodeJob | None, pool: ThreadPoolExecutor,
                 threads: int) -> None:
        self._tierset = tierset
        self._io = io
        self._nodes = nodes
        self._pool = pool
        self._threads = threads
        self._thread = background_pool(1, "promote")
        self._lock = threading.Lock()
        self._queued = False
        self._closed = False

    def after_commit(self) -> None:
        """Queue the promotion of what the newest commit made available (rank 0; every rank for a node tier)."""
        if len(self._io) < 2:
            return
        if self._nodes is not None:
            self._thread.submit(self._from_nodes)
            return
        with self._lock:
            if self._queued or self._closed:
                return
            self._queued = True
        self._thread.submit(self._all)

    def now(self) -> Future[None]:
        """Promote now (rank 0; every rank for a node tier); done when the future is."""
        return self._thread.submit(self._from_nodes if self._nodes is not None else self._all)

    def _all(self) -> None:
        with self._lock:
            self._queued = False
        self._tierset.promote_all()

    def _from_nodes(self) -> None:
        assert self._nodes is not None
        self._nodes.promote(self._io, self._tierset, self._pool, self._threads)

    def wait(self) -> None:
        """Wait for the promotions queued so far."""
        self._thread.submit(lambda: None).result()

    def close(self) -> None:
        """Finish what is queued and stop."""
        with self._lock:
            self._closed = True
        self._thread.shutdown(wait=True)
