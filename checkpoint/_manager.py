"""CheckpointManager: save in the background, promote through the tiers, restore verified."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any, Self

from trainio.storage import CheckpointError, Store

from ._format.nodes import Node
from ._format.state_tree import ArrayLeaf, flatten
from ._handle import SaveHandle, SaveLedger, TierResult
from ._node_job import NodeJob
from ._options import CheckpointOptions
from ._policy import SavePolicy
from ._promotions import Promotions
from ._restore.report import ReadReport
from ._restore.targets import Casting
from ._save.collective import Collective, Exchange, WorldOfOne, distributed_world
from ._save.plan import Plan
from ._save.protocol import StepSaves
from ._save.snapshot import Snapshot, snapshot_into, staging_need
from ._save.staging import StagingPool
from ._threads import background_pool
from ._tier import Tier
from ._tiers import open_tier_io
from ._tiers.commit import TierIO, describe
from ._tiers.lease import LeaseKeeper
from ._tiers.tier_set import TierSet

log = logging.getLogger(__name__)


class CheckpointManager(SavePolicy):
    """Saves training state to a list of tiers, fastest first, and restores it.

    ``save`` returns once the state's tensors are copied to host memory; a
    background thread writes them to the first tier, after which the step is
    copied to each further tier that keeps it, and every tier applies its
    retention. ``restore`` reads the newest committed step from the fastest
    tier that has it, checking every file and falling back to slower tiers.

    Args:
        tiers: :class:`Tier` objects, URLs or mappings of Tier fields, fastest first.
        options: How it works (:class:`CheckpointOptions`); or give the same
            fields as keywords (``CheckpointManager(tiers, max_pending=2)``).

    In a multi-rank save everything outside a DTensor is replicated state,
    saved once: each plain tensor or array and each JSON value (the state of
    ``state_dict()`` objects included) must be the same on every rank, and
    ``save`` compares their xxh3-128 digests across the ranks and refuses a
    difference, naming its place and the ranks. State that differs by rank
    (RNG states, per-rank counters) goes in a :class:`PerRank`: it is saved
    for every rank and each rank restores its own, with the world size it was
    saved with (another world size is refused for it).
    """

    def __init__(self, tiers: Sequence[Tier | str | os.PathLike[str] | Store | Mapping[str, Any]],
                 options: CheckpointOptions | None = None, **settings: Any) -> None:
        if options is not None and settings:
            raise TypeError("give CheckpointOptions or keyword settings, not both")
        self.options = options if options is not None else CheckpointOptions.from_settings(settings)
        if not tiers:
            raise ValueError("a CheckpointManager needs at least one tier")
        self.tiers = [t if isinstance(t, Tier) else Tier.from_config(t) for t in tiers]
        labels = [t.label for t in self.tiers]
        if len(set(labels)) != len(labels):
            raise ValueError(f"tier names must differ: {labels}")
        opts = self.options
        distributed = distributed_world() > 1 if opts.distributed is None else opts.distributed
        exchange: Exchange = Collective(opts.timeout_s) if distributed else WorldOfOne()
        self._rank = exchange.rank
        self._nodes = NodeJob.of(self.tiers, opts.ranks_per_node, exchange)
        self._io: list[TierIO] = [self._nodes.open() if self._nodes is not None and t.node_scoped
                                  else open_tier_io(t.store(), t.label) for t in self.tiers]
        self._staging = StagingPool(opts.max_pending)
        self._pool = background_pool(opts.threads, "io")
        self._saver = background_pool(1, "save")
        self._lock = threading.Lock()
        self._ledger = SaveLedger(labels)
        self._closed = False
        self._saves = StepSaves(exchange, opts, self._nodes.nodes if self._nodes is not None else None)
        committing = len(self._io) if self._rank == 0 else int(self._nodes is not None and self._nodes.commits)
        self._keeper = LeaseKeeper.for_tiers(self._io[:committing], opts.lease_s)  # the tiers this rank commits on
        self._tierset = TierSet(self.tiers, self._io, self._ledger, self._keeper, rank=self._rank, pool=self._pool,
                                threads=opts.threads, attempts=opts.promote_attempts,
                                backoff_s=opts.retry_backoff_s, gpu_direct=opts.gpu_direct)
        self._promotions = Promotions(self._tierset, self._io, self._nodes, self._pool, opts.threads)
        self._start_policy(exchange)
        if self._nodes is not None:
            self._nodes.settle(self._io, self._tierset)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CheckpointManager:
        """A manager from a mapping such as a parsed YAML section::

            {"tiers": [{"url": "/nvme/ckpt", "keep_last": 2}, "s3://bucket/run"], "max_pending": 1}
        """
        return cls(*CheckpointOptions.split_config(config))

    # -- saving ---------------------------------------------------------------------

    def save(self, step: int, state: Any, *, rollback: bool = False,
             metrics: Mapping[str, float] | None = None) -> SaveHandle:
        """Snapshot ``state`` as ``step`` and write it in the background (``rollback``: even if older than the newest;
        ``metrics``: numbers recorded in the manifest, such as ``{"val_loss": 0.31}``, for retention by metric).

        Returns once every array is copied to host memory (waiting first if
        ``max_pending`` saves are in flight); the caller may then change its
        tensors. A value that cannot be checkpointed is refused here, naming
        its place in the state. In a multi-rank job, a plain tensor, array or
        JSON value that differs between the ranks is refused too, naming its
        place and the ranks, unless it is inside a :class:`PerRank` (saved per
        rank, restored to each rank); hashing the replicated tensors costs
        about 0.07 s per GB on each rank (xxh3-128 of the live CPU bytes).

        Raises:
            CheckpointError: an earlier save failed and was not yet reported,
                ``state`` holds something that cannot be saved, the ranks'
                states differ outside PerRank values, the step is older than
                the newest committed one, or the manager is read-only.
        """
        self._check_open()
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, not {step!r}")
        started = time.perf_counter()
        skeleton: Node = {}
        leaves: list[ArrayLeaf] = []
        problem: BaseException | None = self._refusal(step, rollback, metrics)
        try:
            self._ledger.raise_unreported()
            self._tierset.hold(0)
            skeleton, leaves = flatten(state, self._rank)
        except CheckpointError as exc:
            problem = exc  # raised by plan() on every rank alike
        plan, name = self._saves.plan(step, skeleton, leaves, problem, self._io[0])
        plan.metrics = dict(metrics or {})
        mine, packed = self._saves.share(plan, leaves)
        snapshot = snapshot_into(self._staging, skeleton, mine, self.options.pack_bytes, packed)
        handle = self._ledger.open(step)
        handle.blocked_s = time.perf_counter() - started
        future = self._saver.submit(self._write_first, step, snapshot, plan, name, handle)
        if not self.options.async_save:
            future.result()
            handle.wait()
        return handle

    def reserve_staging(self, state: Any) -> None:
        """Allocate now the host memory a save of ``state`` copies into (``max_pending`` copies, pinned for GPU
        tensors), so the first save blocks the job no longer than later ones. Optional: a save allocates it."""
        self._check_open()
        nbytes, pinned = staging_need(flatten(state, self._rank)[1])
        self._staging.prepare(nbytes, pinned=pinned)

    def _write_first(self, step: int, snapshot: Snapshot, plan: Plan, name: str | None, handle: SaveHandle) -> None:
        io = self._io[0]
        try:
            previous = self._tierset.previous(0, step)
            # Retention must leave the step we link unchanged files from alone until this one is committed.
            with self._tierset.using(0, previous.step) if previous is not None else nullcontext():
                retire = partial(self._tierset.doomed, 0) if self._nodes is not None and self._rank == 0 else None
                manifest = self._saves.write(io, step, snapshot, plan, name, previous, self._pool,
                                             self.options.threads, retire)
        except BaseException as exc:  # noqa: BLE001 - every failure is reported through the handle
            error = CheckpointError(f"{io.label}: saving step {step} failed: {describe(exc)}")
            error.__cause__ = exc
            log.error("%s", error)
            self._ledger.record(handle, io.label, TierResult("failed", describe(exc)), exc)
            self._ledger.settle(handle, "skipped", "the first tier failed")
            self._ledger.fail(handle, error)
            return
        finally:
            snapshot.release()
        self._tierset.remember(0, manifest)
        self._ledger.record(handle, io.label, TierResult("committed", nbytes=manifest.nbytes))
        if self._nodes is not None:
            self._promotions.after_commit()  # on every rank, once per committed step
        if self._rank != 0:
            self._ledger.settle(handle, "skipped", "rank 0 promotes")
            return
        if self._nodes is None:
            self._tierset.retain(0)  # a node tier's is applied with the commit, by every node's first rank
            self._promotions.after_commit()
        if len(self._io) == 1:
            self._ledger.settle(handle, "skipped")

    # -- promotion ----------------------------------------------------------------------

    def promote(self) -> None:
        """Copy now every step that a slower tier keeps but lacks; raise what failed.

        In a multi-rank job every rank calls it; rank 0 copies, the others
        return when it is done.

        Raises:
            CheckpointError: a promotion failed after every retry (on rank 0).
        """
        self._check_open()
        self._check_writes("promote")
        self._saver.submit(lambda: None).result()
        if self._rank == 0 or self._nodes is not None:
            self._promotions.now().result()
        self._saves.agree("promote(): waiting for rank 0's promotions", None)
        self._ledger.raise_unreported()

    # -- restoring ------------------------------------------------------------------

    def steps(self) -> dict[str, list[int]]:
        """The committed steps of each tier, oldest first."""
        return self._tierset.steps()

    def latest(self, tiers: Sequence[str | int] | None = None) -> int | None:
        """The newest step committed on any (of the given) tiers, or None."""
        return self._tierset.latest(self._tierset.select(tiers))

    def restore(self, step: int | None = None, *, into: Any = None, keys: Sequence[str] | None = None,
                tiers: Sequence[str | int] | None = None, repair: bool = False, cast: bool = False) -> Any:
        """The saved state of ``step`` (default: the newest committed on any tier).

        Reads each file from the fastest tier holding the step and checks its
        size and xxh3-128; a missing or damaged file is read from the next
        tier instead (and rewritten on the faster one with ``repair=True``).
        Returns the state type for type. With ``into``, tensors and arrays
        at the same places are filled in place (of the saved dtype, or any
        with ``cast``) and objects get ``load_state_dict``. ``keys`` restores only those sub-trees
        ("model", "optimizer/state"). A :class:`PerRank` comes back as this
        rank's own value, still wrapped.

        Raises:
            CheckpointError: no such step, a file is damaged on every tier, the
                step holds PerRank values saved by another world size, or a
                target has another dtype (without ``cast``).
        """
        state, _ = self.restore_with_report(step, into=Casting(into) if cast else into, keys=keys, tiers=tiers,
                                            repair=repair)
        return state

    def restore_with_report(self, step: int | None = None, *, into: Any = None, keys: Sequence[str] | None = None,
                            tiers: Sequence[str | int] | None = None,
                            repair: bool = False) -> tuple[Any, ReadReport]:
        """:meth:`restore`, and what it read, fell back on and repaired."""
        self._check_open()
        chosen = self._tierset.select(tiers)
        if self._nodes is not None and 0 in chosen:
            return self._nodes.restore(self._io, chosen, step, list(keys) if keys else None, into, self._tierset,
                                       self._pool, self.options.threads)
        if step is None:
            step = self._tierset.latest(chosen) if self._rank == 0 else None
            step = self._saves.agree("restore: agreeing on the newest step", step)
            if step is None:
                raise CheckpointError(f"no committed step on {[self.tiers[i].label for i in chosen]}")
        return self._tierset.read(step, chosen, list(keys) if keys else None, into, repair=repair, rank=self._rank,
                                  world=self._saves.world)

    # -- lifecycle ------------------------------------------------------------------

    def wait(self) -> None:
        """Wait for every save and promotion in flight; raise what failed and was not yet reported."""
        self._saver.submit(lambda: None).result()
        self._promotions.wait()
        self._ledger.raise_unreported()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this CheckpointManager is closed")

    def close(self) -> None:
        """Finish everything in flight and release the threads; raise what failed."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._stop_policy()
            self._saver.shutdown(wait=True)
            self._promotions.close()
            self._pool.shutdown(wait=True)
            self._keeper.close()
            self._saves.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as exc:
            log.error("while closing the checkpoint manager: %s", exc)
