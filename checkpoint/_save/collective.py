"""The checkpoint's own gloo process groups, with timeouts that name the ranks that did not report.

A trainer's own collectives must never interleave with ours (that deadlocks),
and ``save()`` runs in the trainer's thread while commits run in a background
thread and promotions from a node tier in another, so there are three groups
(lanes): one for each thread. Before every exchange a
monitored barrier checks that every rank arrived, so a dead or stuck rank
fails the others within the timeout instead of leaving them waiting forever.
Each rank also marks its arrival in the job's key-value store, so whichever
way gloo reports the failure, every survivor names the ranks that never came.
"""

from __future__ import annotations

import re
import secrets
import sys
from datetime import timedelta
from typing import Any, Protocol

from trainio.storage import CheckpointError

Lane = bool | str
"""Which group an exchange runs in: False (the trainer's thread), True (the background writer), or "promote"."""
_LANES = {False: "front", True: "back", "promote": "promote"}
_FAILED_RANKS = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")


def _job_store(dist: Any) -> Any:
    """The job's key-value store (the default group's), or None where torch does not expose it."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def distributed_world() -> int:
    """The world size of the initialized default process group, or 1 when there is none.

    Imports nothing: a process group exists only if its creator imported torch.distributed.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return int(dist.get_world_size())


class Exchange(Protocol):
    """The exchanges a save needs between its ranks (:class:`Collective`, or :class:`WorldOfOne`)."""

    rank: int
    world: int

    def all_gather(self, what: str, payload: Any, *, background: Lane = False) -> list[Any]:
        """Every rank's ``payload``, in rank order, on every rank."""

    def gather(self, what: str, payload: Any, *, background: Lane = False) -> list[Any] | None:
        """Every rank's ``payload`` in rank order on rank 0; None on the others."""

    def broadcast(self, what: str, payload: Any, *, background: Lane = False) -> Any:
        """Rank 0's ``payload`` on every rank."""

    def exchange(self, what: str, outgoing: dict[int, bytes], *, background: Lane = False) -> dict[int, memoryview]:
        """Send ``outgoing[r]`` to rank ``r``, for each ``r``; what every rank sent this one, by sender."""

    def most(self, what: str, value: int, *, background: Lane = False) -> int:
        """The largest ``value`` of any rank, on every rank."""

    def close(self) -> None:
        """Release what the exchanges hold."""


class WorldOfOne:
    """The exchanges of a single process: it is rank 0 of a world of one (no torch.distributed, no torch)."""

    rank = 0
    world = 1

    def all_gather(self, what: str, payload: Any, *, background: Lane = False) -> list[Any]:
        """``[payload]``."""
        return [payload]

    def gather(self, what: str, payload: Any, *, background: Lane = False) -> list[Any] | None:
        """``[payload]``."""
        return [payload]

    def broadcast(self, what: str, payload: Any, *, background: Lane = False) -> Any:
        """``payload``."""
        return payload

    def exchange(self, what: str, outgoing: dict[int, bytes], *, background: Lane = False) -> dict[int, memoryview]:
        """What this rank sent itself."""
        return {0: memoryview(outgoing[0])} if 0 in outgoing else {}

    def most(self, what: str, value: int, *, background: Lane = False) -> int:
        """``value``."""
        return value

    def close(self) -> None:
        """Nothing to release."""


class Collective:
    """Exchanges between the ranks of a multi-rank checkpoint; create it on every rank, in the same order."""

    def __init__(self, timeout_s: float) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = int(dist.get_rank())
        self.world = int(dist.get_world_size())
        self.timeout = timedelta(seconds=timeout_s)
        self._groups = {lane: dist.new_group(backend="gloo", timeout=self.timeout) for lane in _LANES.values()}
        self._store = _job_store(dist)
        box = [secrets.token_hex(6)]
        dist.broadcast_object_list(box, src=0, group=self._groups["front"])  # one name for this manager everywhere
        self._name = f"trainio-ckpt/{box[0]}"
        self._sequence = dict.fromkeys(_LANES.values(), 0)

    def _group(self, background: Lane) -> Any:
        return self._groups[_LANES[background]]

    def _mark(self, background: Lane, sequence: int, rank: int) -> str:
        return f"{self._name}/{_LANES[background]}/{sequence}/{rank}"

    def _timeout_error(self, what: str, exc: BaseException, background: Lane, sequence: int) -> CheckpointError:
        seconds = self.timeout.total_seconds()
        missing = self._missing(background, sequence)
        if not missing:
            found = _FAILED_RANKS.search(str(exc))
            missing = [int(r) for r in found.group(1).replace(",", " ").split()] if found else []
        if missing:
            return CheckpointError(f"{what}: rank(s) {missing} did not report within {seconds:g} s "
                                   "(dead, stuck, or not calling the checkpoint manager)")
        return CheckpointError(f"{what}: every rank arrived, but the exchange failed or timed out after "
                               f"{seconds:g} s: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")

    def _missing(self, background: Lane, sequence: int) -> list[int]:
        if self._store is None:
            return []
        try:
            return [r for r in range(self.world) if not self._store.check([self._mark(background, sequence, r)])]
        except RuntimeError:  # the store's host (rank 0's process) is gone too
            return [0] if self.rank else []

    def _run(self, what: str, background: Lane, call: Any) -> Any:
        group = self._group(background)
        lane = _LANES[background]
        sequence = self._sequence[lane] = self._sequence[lane] + 1
        if self._store is not None:
            self._store.set(self._mark(background, sequence, self.rank), "1")
        try:
            self._dist.monitored_barrier(group=group, timeout=self.timeout, wait_all_ranks=True)
            result = call(group)
        except RuntimeError as exc:
            raise self._timeout_error(what, exc, background, sequence) from exc
        if self._store is not None and sequence > 1:  # every rank is past the previous exchange: forget it
            self._store.delete_key(self._mark(background, sequence - 1, self.rank))
        return result

    def all_gather(self, what: str, payload: Any, *, background: Lane = False) -> list[Any]:
        """Every rank's ``payload``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        self._run(what, background, lambda g: self._dist.all_gather_object(out, payload, group=g))
        return out

    def gather(self, what: str, payload: Any, *, background: Lane = False) -> list[Any] | None:
        """Every rank's ``payload`` in rank order on rank 0; None on the others."""
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        self._run(what, background, lambda g: self._dist.gather_object(payload, out, dst=self._global(0, g),
                                                                        group=g))
        return out

    def broadcast(self, what: str, payload: Any, *, background: Lane = False) -> Any:
        """Rank 0's ``payload`` on every rank."""
        box = [payload if self.rank == 0 else None]
        self._run(what, background, lambda g: self._dist.broadcast_object_list(box, src=self._global(0, g),
                                                                                group=g))
        return box[0]

    def exchange(self, what: str, outgoing: dict[int, bytes], *, background: Lane = False) -> dict[int, memoryview]:
        """Send ``outgoing[r]`` to rank ``r``, for each ``r``; what every rank sent this one, by sender.

        Two all-to-alls (the sizes, then the bytes): each rank sends and
        receives only its own messages and one size per rank.
        """
        import numpy as np
        import torch

        sizes = torch.tensor([len(outgoing.get(r, b"")) for r in range(self.world)], dtype=torch.int64)
        incoming = torch.empty(self.world, dtype=torch.int64)
        sent = torch.empty(int(sizes.sum()), dtype=torch.uint8)
        sending = sent.numpy()
        start = 0
        for rank in range(self.world):  # one copy of every message, into the tensor gloo sends
            message = outgoing.get(rank, b"")
            sending[start:start + len(message)] = np.frombuffer(message, np.uint8)
            start += len(message)

        def swap(group: Any) -> torch.Tensor:
            self._dist.all_to_all_single(incoming, sizes, group=group)
            received = torch.empty(int(incoming.sum()), dtype=torch.uint8)
            self._dist.all_to_all_single(received, sent, incoming.tolist(), sizes.tolist(), group=group)
            return received

        data = memoryview(self._run(what, background, swap).numpy())  # no copy: the tensor lives on in it
        out: dict[int, memoryview] = {}
        start = 0
        for rank, size in enumerate(incoming.tolist()):
            if size:
                out[rank] = data[start:start + size]
            start += size
        return out

    def most(self, what: str, value: int, *, background: Lane = False) -> int:
        """The largest ``value`` of any rank, on every rank (one all-reduce of one number)."""
        import torch

        box = torch.tensor([value], dtype=torch.int64)
        self._run(what, background, lambda g: self._dist.all_reduce(box, op=self._dist.ReduceOp.MAX, group=g))
        return int(box[0])

    def close(self) -> None:
        """Release the groups (local: gloo groups need no peer to be destroyed)."""
        for group in self._groups.values():
            try:
                self._dist.destroy_process_group(group)
            except (RuntimeError, ValueError):  # the default group is already gone: nothing left to release
                pass

    def _global(self, group_rank: int, group: Any) -> int:
        return int(self._dist.get_global_rank(group, group_rank))
