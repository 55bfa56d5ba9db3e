"""Resumable: a StreamingDataset's epoch and position, as a state to save, and a saved state checked and resumed."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from ._order.resume_state import (
    HOW_TO_KNOW,
    STATE_FORMAT,
    STATE_VERSION,
    PositionUnknown,
    ResumeMismatch,
    check_partitions,
    check_state,
    check_worker_yielded,
    state_differences,
)
from ._workers import in_worker, worker_info

if TYPE_CHECKING:
    import mmap

    from ._order.epoch_order import Layout, Uneven
    from ._order.epoch_plan import Position
    from ._read.dataset import Dataset
    from ._workers import SharedEpochs


class Resumable:
    """What :class:`~trainio.loaders.StreamingDataset` saves and resumes: its epoch, its position in it, and what it
    belongs to; and how the epoch advances from pass to pass."""

    _counts: tuple[int, ...]
    _position: Position
    _batch: int
    _seed: int
    _shuffle: bool
    _window: int
    _epoch_size: int | None
    _uneven: Uneven
    _datasets: tuple[Dataset, ...]
    _weights: tuple[float, ...]
    _worker_flag: mmap.mmap | None
    _sent_away: bool
    _epochs: SharedEpochs
    _epoch_chosen: bool

    if TYPE_CHECKING:  # what the dataset class this is mixed into provides
        @property
        def dataset(self) -> Dataset: ...

        @property
        def partitions(self) -> int: ...

        def layout(self, workers: int = 1, worker: int = 0) -> Layout: ...

        def _node(self) -> tuple[int, int]: ...

    @property
    def epoch(self) -> int:
        """The epoch being read, or between epochs the one the next iteration reads (see :meth:`set_epoch`)."""
        self._sync_epoch()
        return self._position.epoch

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` next (from its start, unless a loaded state resumes inside it).

        Without it the epoch advances by itself: a pass that reads an epoch
        to its end (here, through :class:`Loader`, or in the DataLoader
        workers forked from this process, persistent or not) makes the next
        pass read the next epoch, each in its own order; a pass broken off
        early leaves the next one to go on with the same epoch. A call wins
        over that count, and a loaded state sets it. Workers started by
        ``spawn`` (not persistent) cannot see each other's passes: they warn
        that the epoch does not advance unless this is called before each.

        Raises:
            ValueError: ``epoch`` is not a non-negative integer.
        """
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"set_epoch({epoch!r}): the epoch must be a non-negative integer")
        epoch = int(epoch)
        self._epochs.set(epoch)
        self._epoch_chosen = True
        if epoch != self._position.epoch:
            self._position.restart(epoch)

    def _sync_epoch(self) -> None:
        """Move to the epoch the passes have reached: the next one after a pass here read its epoch to the end,
        the one the latest pass began where copies in other processes iterate."""
        epoch = self._epochs.upcoming if self._position.counted_here else self._epochs.current
        if epoch != self._position.epoch:
            self._position.restart(epoch)

    def _begin_pass(self) -> None:
        """A pass over the dataset starts here (this process, a worker, or a Loader): settle its epoch."""
        if not self._epochs.shared and in_worker() and not self._epoch_chosen:
            warnings.warn(f"{self.dataset.url}: this DataLoader worker was started by spawn and cannot see the "
                          f"epochs other processes read, so it reads epoch {self._epochs.upcoming} again each "
                          "epoch: call set_epoch(epoch) before each epoch, or use persistent_workers=True, the "
                          "fork start method, or trainio's Loader", RuntimeWarning, stacklevel=3)
        epoch = self._epochs.begin()
        if epoch != self._position.epoch:
            self._position.restart(epoch)

    def _end_pass(self) -> None:
        """The pass read its epoch to the end: the next one reads the next epoch."""
        self._epochs.done(self._position.epoch)

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Where the epoch stands, as JSON-able data naming what it belongs to.

        Three ways to take it:

        - ``state_dict(consumed=steps * global_batch)`` anywhere: the samples
          of the epoch's global sequence consumed so far, across all ranks.
          Resumable under any layout.
        - ``state_dict()`` in the process that iterates the dataset itself
          (no DataLoader workers, or through :class:`Loader`): counted here,
          in whole global batches. Resumable under any layout.
        - ``state_dict()`` inside a DataLoader worker, as torchdata's
          ``StatefulDataLoader`` calls it: this worker's own position, which
          only the same worker of a DataLoader with as many workers can
          resume (torchdata's convention).

        Raises:
            PositionUnknown: ``state_dict()`` without ``consumed`` in a process
                that did not iterate the dataset while DataLoader workers (or
                other copies) did, such as the main process of a stock
                DataLoader with workers: its count would be wrong.
            ValueError: ``consumed`` is not an integer within the epoch.
        """
        worker = None
        size = sum(self._counts)
        if not in_worker():
            self._sync_epoch()
        position = self._position
        if consumed is not None:
            step = self.layout().ranks * self._batch
            if not isinstance(consumed, (int, np.integer)) or isinstance(consumed, bool) or not \
                    0 <= consumed <= size + step:
                raise ValueError(f"state_dict(consumed={consumed!r}): must be an integer from 0 to {size}, the "
                                 "samples of the current epoch consumed by all ranks together")
            consumed = min(int(consumed), size)  # beyond: the padded last global batch, the epoch is done
        elif in_worker():
            workers, worker_id = worker_info()
            consumed = position.start
            worker = {"id": worker_id, "workers": workers, "yielded": position.skip + position.delivered}
        else:
            self._check_position_known()
            layout = self.layout()
            consumed = min(size, position.start + (position.delivered // layout.batch) * layout.batch * layout.ranks)
        state = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "epoch": position.epoch, "consumed": int(consumed),
            "seed": self._seed, "shuffle": self._shuffle, "shuffle_window": self._window,
            "epoch_size": self._epoch_size, "partitions": self.partitions, "global_batch": self.layout().ranks * self._batch,
            "datasets": [{"url": d.url, "index_xxh3": d.index_xxh3, "weight": w}
                         for d, w in zip(self._datasets, self._weights)],
        }
        if worker is not None:
            state["worker"] = worker
        return state

    def _check_position_known(self) -> None:
        """Raise :class:`PositionUnknown` if this process's count is not the position (see :meth:`state_dict`)."""
        in_workers = self._worker_flag is not None and self._worker_flag[0] != 0
        if in_workers or (self._sent_away and not self._position.counted_here):
            where = "DataLoader workers iterated it" if in_workers else "it was sent to other processes"
            raise PositionUnknown(f"{self.dataset.url}: state_dict() cannot know the position: {where}, and this "
                                  f"process's copy never sees their progress (it would say epoch "
                                  f"{self._position.epoch}, consumed {self._position.start}); {HOW_TO_KNOW}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where ``state`` was taken, under this (possibly different) layout.

        Every field is checked before anything changes.

        Raises:
            ResumeMismatch: the state is malformed (naming the field: a
                negative or too large ``consumed``, a negative ``epoch``, a
                ``worker.yielded`` beyond that worker's share), or belongs to
                another dataset, seed or shuffle configuration (naming each
                difference), or is one DataLoader worker's position and this
                is not the same worker of as many, or its epoch is cut into
                partitions this job's nodes cannot read (naming the node
                counts that can) or for another global batch.
        """
        size = sum(self._counts)
        check_state(state, size)
        differences = state_differences(state, self.state_dict(consumed=0))
        if differences:
            raise ResumeMismatch("cannot resume: " + "; ".join(differences) +
                                 " (resuming would silently change the sample order)")
        partitions = check_partitions(state, self._node()[0], self.layout().ranks * self._batch, size)
        skip = self._worker_skip(state.get("worker"), size, state["consumed"])
        self._position.resume(state["epoch"], state["consumed"], skip, partitions)
        self._epochs.set(state["epoch"])
        self._epoch_chosen = True

    def _worker_skip(self, saved: dict[str, int] | None, size: int, start: int) -> int:
        """How many of this worker's samples a per-worker state says were consumed (0 for a global state)."""
        if saved is None:
            return 0
        workers, worker = worker_info()
        if (saved["workers"], saved["id"]) != (workers, worker):
            raise ResumeMismatch(f"this state is DataLoader worker {saved['id']} of {saved['workers']}'s "
                                 f"own position; it cannot resume worker {worker} of {workers}: resume it with as "
                                 "many workers, or save a global position with state_dict(consumed=steps * "
                                 "global_batch)")
        share = self.layout(workers, worker).positions(size, start, self._uneven).size
        return check_worker_yielded(saved, share)
