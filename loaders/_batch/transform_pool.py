"""TransformPool: worker processes that read, transform and stack a Loader's batches into shared memory, in order."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from .shared_slots import SharedRing, SharedSlot, remove_orphans
from .transform_worker import Transform, work

if TYPE_CHECKING:
    from .._order.epoch_plan import EpochPlan
    from .._order.mixture import MixedReader
    from .._read.shard_reader import ShardReader
    from .._streaming import StreamingDataset

_POLL_S = 0.1
_STOP_S = 5.0


class WorkerFailed(RuntimeError):
    """A transform worker raised, or died; the message names it, and the sample where it can."""


class TransformPool:
    """``workers`` processes serving one Loader from epoch to epoch; each batch is stacked into a shared slot.

    Started by fork where the platform has it (the dataset and the
    transform are inherited, not pickled), else by ``spawn`` (both must
    pickle). Each batch's samples are read in the worker from the dataset
    (checked as every read is), each transformed with Python's, numpy's and
    torch's generators seeded by (seed, epoch, the sample's position in the
    epoch), and stacked into a slot of shared memory the trainer's arrays
    then view; the slot is reused once they have all died.
    """

    def __init__(self, dataset: StreamingDataset, transform: Transform | None, workers: int,
                 slot_bytes: int, start_method: str | None = None) -> None:
        remove_orphans()
        methods = multiprocessing.get_all_start_methods()
        context: Any = multiprocessing.get_context(start_method or ("fork" if "fork" in methods else "spawn"))
        self._tasks: Any = context.Queue()
        self._results: Any = context.Queue()
        self.ring = SharedRing(slot_bytes)
        self._token = 0
        self._stale: dict[tuple[int, int], SharedSlot] = {}
        self._digested = tuple(dict.fromkeys(name for _, info in dataset._shards if info.row_xxh3 is not None
                                             for name in info.row_xxh3.fields))  # the fields with row digests
        self._processes = [context.Process(target=work, args=(dataset, transform, self._tasks, self._results, w,
                                                              os.getpid()),
                                           name=f"trainio-transform-{w}", daemon=True) for w in range(workers)]
        try:
            for process in self._processes:
                process.start()
        except BaseException:
            self.close()
            raise

    def epoch(self, plan: EpochPlan, batch_size: int, drop_last: bool, in_flight: int,
              timeout_s: float | None = None) -> Generator[tuple[dict[str, Any], int, int], None, None]:
        """The batches of ``plan`` in order, each with its sample and byte count, ``in_flight`` of them prepared ahead.

        Raises:
            WorkerFailed: a worker raised (its error and traceback, and the sample) or died (its exit code), or
                no batch came for ``timeout_s`` seconds while some were awaited.
        """
        self._token += 1
        token = self._token
        reader = plan.open_reader()  # hears the plan here: a local dataset's shards are checked ahead, or their rows
        # The workers check each row they use against the digests sent them. Their page faults are read ahead of by
        # the kernel: reading ahead here too slowed a cold first epoch in order by a quarter (1.69 s against 2.15).
        reader.leave_rows_to_readers(read_ahead=False)
        batches = _batch_tasks(plan, reader, batch_size, drop_last, self._digested)
        pending: dict[int, SharedSlot] = {}
        done: dict[int, tuple[dict[str, Any], int, int] | WorkerFailed] = {}
        sent = wanted = 0
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) + len(done) < in_flight:
                    task = next(batches, None)
                    if task is None:
                        exhausted = True
                        break
                    slot = self.ring.take()
                    pending[sent] = slot
                    self._tasks.put((token, sent, slot.name, plan.position.epoch, *task))
                    sent += 1
                if wanted in done:
                    ready = done.pop(wanted)
                    if isinstance(ready, WorkerFailed):
                        raise ready
                    yield ready
                    wanted += 1
                    continue
                if exhausted and not pending:
                    return
                waiting = time.monotonic()
                while not self._receive(token, pending, done):
                    if timeout_s is not None and time.monotonic() - waiting > timeout_s:
                        raise WorkerFailed(f"no batch from the transform workers for {timeout_s:g} s (timeout_s): "
                                           f"{len(pending)} batches awaited; a transform may be stuck")
        finally:
            batches.close()
            reader.close()
            for index, slot in pending.items():  # their results come later: the slots go back then
                self._stale[(token, index)] = slot

    def _receive(self, token: int, pending: dict[int, SharedSlot],
                 done: dict[int, tuple[dict[str, Any], int, int] | WorkerFailed]) -> bool:
        """Take one message from the workers, if one comes soon; whether one did."""
        try:
            message = self._results.get(timeout=_POLL_S)
        except queue.Empty:
            self._check_alive()
            return False
        kind, their_token, index = message[:3]
        if their_token != token:
            slot = self._stale.pop((their_token, index), None)
            if slot is not None:
                self.ring.give_back(self.ring.adopt(slot, message[3]) if kind == "ok" and message[3] else slot)
            return True
        if kind == "error":  # raised in its turn: the batches before it are delivered first
            worker, where, error, trace = message[3:]
            done[index] = WorkerFailed(f"transform worker {worker} failed at {where}: {error}\n{trace}")
            self.ring.give_back(pending.pop(index))
            return True
        made, layout, others, count, nbytes = message[3:]
        slot = pending.pop(index)
        if made is not None:
            slot = self.ring.adopt(slot, made)
        batch: dict[str, Any] = self.ring.arrays(slot, layout)
        batch.update(others)
        done[index] = (batch, count, nbytes)
        return True

    def _check_alive(self) -> None:
        for number, process in enumerate(self._processes):
            if process.exitcode is not None:
                code = process.exitcode
                how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                raise WorkerFailed(f"transform worker {number} (pid {process.pid}) died ({how}); the loader's "
                                   "workers are stopped, and the next epoch starts new ones")

    @property
    def alive(self) -> bool:
        """Whether every worker still runs."""
        return all(p.exitcode is None for p in self._processes)

    def close(self) -> None:
        """Stop the workers (waiting a few seconds, then killing them) and remove every slot."""
        for process in self._processes:
            if process.is_alive():
                self._tasks.put(None)
        deadline = time.monotonic() + _STOP_S
        for process in self._processes:
            if process.pid is not None:
                process.join(max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join()
        self._tasks.close()
        self._results.close()
        self.ring.close()


def _batch_tasks(plan: EpochPlan, reader: ShardReader | MixedReader, batch_size: int, drop_last: bool,
                 fields: tuple[str, ...]) -> Generator[tuple[Any, ...], None, None]:
    """The plan's batches as (positions, shards, record batches, rows within them, ``fields``, and per field which
    rows to check (None: all) and their digests (None: no row)), planning ``reader`` ahead of them.

    The reader reads no batch: the workers read the shards themselves. The
    rows of local shards with row digests are checked by the workers against
    the digests sent with their batch, looked up here a chunk of the plan at
    a time; other local shards are hashed whole here ahead of them (within
    the read-ahead bound), which the workers wait for; a remote one's cache
    here downloads nothing.

    Raises:
        IntegrityError, FormatError, NotFound, StoreError: a shard's row digests file is damaged or missing.
    """
    carry: list[np.ndarray] | None = None
    for positions, shards, batches, within, rows in plan.positioned(reader):
        chunk = [positions, shards, batches, within, *_row_checks(reader, fields, shards, rows)]
        parts = chunk if carry is None else [np.concatenate((a, b), axis=-1) for a, b in zip(carry, chunk)]
        size = parts[0].size
        whole = size - size % batch_size
        every, some = bool(parts[-2].all()), bool(parts[-2].any())  # said once per batch by None
        for begin in range(0, whole, batch_size):
            *located, checked, expected = (part[..., begin:begin + batch_size] for part in parts)
            yield (*located, fields, None if every else checked, expected if some else None)
        carry = [part[..., whole:] for part in parts]
    if carry is not None and carry[0].size and not drop_last:
        *located, checked, expected = carry
        yield (*located, fields, None if checked.all() else checked, expected if checked.any() else None)


def _row_checks(reader: ShardReader | MixedReader, fields: tuple[str, ...], shards: np.ndarray,
                rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per field of ``fields`` and sample (row ``rows[i]`` of shard ``shards[i]``), whether a worker checks it
    against its row digest, and that digest: for every field of each row of a shard that has row digests."""
    checked = np.zeros((len(fields), shards.size), dtype=bool)
    expected = np.zeros((len(fields), shards.size), dtype=np.uint64)
    for shard in np.unique(shards).tolist() if fields else []:
        table = reader.row_digests(shard)
        if table is not None:
            at = np.flatnonzero(shards == shard)
            for name, digests in table.items():
                field = fields.index(name)
                checked[field, at] = True
                expected[field, at] = digests[rows[at]]
    return checked, expected
