"""CheckpointManager: save in the background, promote through the tiers, restore verified."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Self

from trainio.storage import CheckpointError, Store, open_store

from ._collective import distributed_world
from ._handle import SaveHandle, TierResult
from ._layout import CHUNK_BYTES, PACK_BYTES, parse_compression
from ._lease import Lease, LeaseKeeper
from ._manifest import Manifest
from ._nodes import Node
from ._plan import Plan
from ._read import ReadReport, StepReader
from ._sharded import ShardedSaves
from ._snapshot import Snapshot, take_snapshot
from ._staging import StagingPool
from ._tier import Tier
from ._tier_io import TierIO, describe, open_tier_io
from ._tree import ArrayLeaf, flatten
from ._write import copy_step, write_snapshot

log = logging.getLogger(__name__)

_KEEP_HANDLES = 256


class CheckpointManager:
    """Saves training state to a list of tiers, fastest first, and restores it.

    ``save`` returns once the state's tensors are copied to host memory; a
    background thread writes them to the first tier, after which the step is
    copied to each further tier that keeps it, and every tier applies its
    retention. ``restore`` reads the newest committed step from the fastest
    tier that has it, checking every file and falling back to slower tiers.

    Args:
        tiers: :class:`Tier` objects, URLs or mappings of Tier fields, fastest first.
        async_save: Write in the background (default). With False, ``save``
            returns once the first tier has committed (promotion still runs behind).
        max_pending: Saves that may be in flight at once; the next ``save``
            waits for one to finish. Host staging memory is this many copies of the state.
        threads: Parallel file writers and readers.
        promote_attempts: Tries per promotion of a step before it is reported as failed.
        retry_backoff_s: Pause before the second try, doubling after each.
        chunk_bytes: Largest chunk file of an array; bigger arrays are split
            into chunks written and read in parallel.
        pack_bytes: Arrays up to this size are stored together in the step's
            pack (see :data:`~trainio.checkpoint.PACK_PATH`), not one zarr array
            each: thousands of tiny files per step are slow to create and delete.
        compression: None (default: chunks stored raw, read straight into the
            tensors), ``"zstd"`` or ``"zstd:<level>"``: smaller steps for
            compressible state, at the cost of CPU time on save and restore.
        distributed: Whether saves are collective over the ranks of the
            initialized ``torch.distributed`` job (default: when one with more
            than one rank is). Then every rank must create the manager and
            call ``save``/``restore`` alike; each writes only what it owns, and
            rank 0 commits, promotes and applies retention. The first tier
            must be storage every rank sees (a shared file system, S3).
        timeout_s: How long a rank waits for the others at each exchange of a
            multi-rank save or restore before failing, naming the ranks missing.
        lease_s: How long a tier's lease lasts unrenewed. One job writes a tier
            at a time: the first ``save`` takes the first tier's lease and
            the first promotion into a slower tier that tier's (rank 0 alone,
            in a multi-rank job); leases are renewed in the background and
            checked before every commit; a second job is
            refused naming the holder, and a lease left unrenewed this long
            (its job died) is taken over. Only then are a dead writer's
            leftovers removed. Restoring never needs the lease.

    In a multi-rank save everything outside a DTensor is replicated state,
    saved once: each plain tensor or array and each JSON value (the state of
    ``state_dict()`` objects included) must be the same on every rank, and
    ``save`` compares their xxh3-128 digests across the ranks and refuses a
    difference, naming its place and the ranks. State that differs by rank
    (RNG states, per-rank counters) goes in a :class:`PerRank`: it is saved
    for every rank and each rank restores its own, with the world size it was
    saved with (another world size is refused for it).
    """

    def __init__(self, tiers: Sequence[Tier | str | os.PathLike[str] | Store | Mapping[str, Any]], *, async_save: bool = True,
                 max_pending: int = 1, threads: int = 4, promote_attempts: int = 3,
                 retry_backoff_s: float = 1.0, chunk_bytes: int = CHUNK_BYTES,
                 pack_bytes: int = PACK_BYTES, compression: str | None = None,
                 distributed: bool | None = None, timeout_s: float = 600.0, lease_s: float = 60.0) -> None:
        if not tiers:
            raise ValueError("a CheckpointManager needs at least one tier")
        if not lease_s > 0:
            raise ValueError(f"lease_s must be a positive number of seconds, not {lease_s!r}")
        if min(max_pending, threads, promote_attempts, chunk_bytes) < 1 or pack_bytes < 0:
            raise ValueError("max_pending, threads, promote_attempts and chunk_bytes must be >= 1, "
                             "pack_bytes >= 0")
        self.tiers = [t if isinstance(t, Tier) else Tier.from_config(t) for t in tiers]
        labels = [t.label for t in self.tiers]
        if len(set(labels)) != len(labels):
            raise ValueError(f"tier names must differ: {labels}")
        self._io: list[TierIO] = [open_tier_io(self._store(t), t.label) for t in self.tiers]
        self._async = async_save
        self._threads = threads
        self._attempts = promote_attempts
        self._backoff = retry_backoff_s
        self._chunk_bytes = chunk_bytes
        self._pack_bytes = pack_bytes
        self._codec = parse_compression(compression)
        self._staging = StagingPool(max_pending)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="trainio-ckpt-io", initializer=_lower_priority)
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="trainio-ckpt-save", initializer=_lower_priority)
        self._promoter = ThreadPoolExecutor(1, thread_name_prefix="trainio-ckpt-promote",
                                            initializer=_lower_priority)
        self._lock = threading.Lock()
        self._in_use: Counter[tuple[int, int]] = Counter()
        self._handles: dict[int, SaveHandle] = {}
        self._failures: list[tuple[SaveHandle | None, CheckpointError]] = []
        self._newest: list[Manifest | None] = [None] * len(self._io)  # the last manifest each tier committed
        self._known: list[set[int]] = [set() for _ in self._io]
        self._tier_locks = [threading.RLock() for _ in self._io]
        self._promotion_queued = False
        self._closed = False
        if distributed is None:
            distributed = distributed_world() > 1
        self._sharded = ShardedSaves(timeout_s, chunk_bytes, pack_bytes, self._codec) if distributed else None
        self._rank = self._sharded.rank if self._sharded is not None else 0
        leases = [Lease(io.store, io.label, lease_s) for io in self._io] if self._rank == 0 else []
        for io, lease in zip(self._io, leases, strict=False):
            io.lease = lease
        self._keeper = LeaseKeeper(leases, lease_s)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CheckpointManager:
        """A manager from a mapping such as a parsed YAML section::

            {"tiers": [{"url": "/nvme/ckpt", "keep_last": 2}, "s3://bucket/run"], "max_pending": 1}
        """
        options = dict(config)
        tiers = options.pop("tiers", None)
        if not isinstance(tiers, Sequence) or isinstance(tiers, str):
            raise ValueError("the checkpoint config needs a 'tiers' list")
        return cls(tiers, **options)

    @staticmethod
    def _store(tier: Tier) -> Store:
        return tier.url if isinstance(tier.url, Store) else open_store(tier.url, options=tier.options)

    # -- saving ---------------------------------------------------------------------

    def save(self, step: int, state: Any) -> SaveHandle:
        """Snapshot ``state`` as ``step`` and write it in the background.

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
                ``state`` holds something that cannot be saved, or the ranks'
                states differ outside PerRank values.
        """
        self._check_open()
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, not {step!r}")
        if self._sharded is not None:
            return self._save_sharded(step, state)
        self._raise_failures()
        self._hold(0)
        skeleton, leaves = flatten(state)
        started = time.perf_counter()
        snapshot = self._snapshot(skeleton, leaves)
        return self._submit(step, started, snapshot, None)

    def _snapshot(self, skeleton: Node, leaves: list[ArrayLeaf], packed: frozenset[str] | None = None) -> Snapshot:
        slot = self._staging.acquire()
        try:
            return take_snapshot(skeleton, leaves, slot, self._pack_bytes, packed)
        except BaseException:
            slot.release()
            raise

    def _submit(self, step: int, started: float, snapshot: Snapshot,
                sharded: tuple[Plan, str | None] | None) -> SaveHandle:
        handle = SaveHandle(step, [t.label for t in self.tiers])
        handle.blocked_s = time.perf_counter() - started
        with self._lock:
            self._handles[step] = handle
            while len(self._handles) > _KEEP_HANDLES:
                self._handles.pop(next(iter(self._handles)))
        future = self._saver.submit(self._write_first, step, snapshot, sharded, handle)
        if not self._async:
            future.result()
            handle.wait()
        return handle

    def _save_sharded(self, step: int, state: Any) -> SaveHandle:
        assert self._sharded is not None
        started = time.perf_counter()
        skeleton: Node = {}
        leaves: list[ArrayLeaf] = []
        problem: BaseException | None = None
        try:
            self._raise_failures()
            self._hold(0)
            skeleton, leaves = flatten(state, self._sharded.rank)
        except CheckpointError as exc:
            problem = exc
        plan, name = self._sharded.plan(step, skeleton, leaves, problem, self._io[0])
        mine, packed = self._sharded.share(plan, leaves)
        snapshot = self._snapshot(skeleton, mine, packed)
        return self._submit(step, started, snapshot, (plan, name))

    def _write_first(self, step: int, snapshot: Snapshot, sharded: tuple[Plan, str | None] | None,
                     handle: SaveHandle) -> None:
        io = self._io[0]
        try:
            previous = self._previous(0, step)
            # Retention must leave the step we link unchanged files from alone until this one is committed.
            with self._using(0, previous.step) if previous is not None else nullcontext():
                if sharded is None:
                    manifest = write_snapshot(io, step, snapshot, previous, self._pool, self._threads,
                                              chunk_bytes=self._chunk_bytes, codec=self._codec)
                else:
                    assert self._sharded is not None
                    manifest = self._sharded.write(io, step, snapshot, *sharded, previous, self._pool, self._threads)
        except BaseException as exc:  # noqa: BLE001 - every failure is reported through the handle
            error = CheckpointError(f"{io.label}: saving step {step} failed: {describe(exc)}")
            error.__cause__ = exc
            log.error("%s", error)
            handle._set(io.label, TierResult("failed", describe(exc)), exc)
            handle._settle_rest("skipped", "the first tier failed")
            with self._lock:
                self._failures.append((handle, error))
            return
        finally:
            snapshot.release()
        self._remember(0, manifest)
        handle._set(io.label, TierResult("committed", nbytes=manifest.nbytes))
        if self._rank != 0:
            handle._settle_rest("skipped", "rank 0 promotes")
            return
        self._retain(0)
        if len(self._io) > 1:
            self._schedule_promotion()
        else:
            handle._settle_rest("skipped")

    def _previous(self, tier: int, step: int) -> Manifest | None:
        """The manifest of the newest committed step before ``step`` on a tier (incremental saves).

        None when there is none or it cannot be read: that only costs the incremental saving.
        """
        try:
            earlier = [s for s in self._io[tier].steps() if s < step]
            if not earlier:
                return None
            cached = self._newest[tier]
            if cached is not None and cached.step == earlier[-1]:
                return cached
            return self._io[tier].manifest(earlier[-1])
        except Exception as exc:  # noqa: BLE001 - the write that follows reports a tier that is really down
            log.warning("%s: no previous step to link unchanged files from, writing step %d in full: %s",
                        self._io[tier].label, step, describe(exc))
            return None

    def _remember(self, tier: int, manifest: Manifest) -> None:
        newest = self._newest[tier]
        if newest is None or manifest.step > newest.step:
            self._newest[tier] = manifest

    # -- promotion and retention ------------------------------------------------------

    def _schedule_promotion(self) -> None:
        with self._lock:
            if self._promotion_queued or self._closed:
                return
            self._promotion_queued = True
        self._promoter.submit(self._promote_all)

    def _promote_all(self) -> None:
        with self._lock:
            self._promotion_queued = False
        for target in range(1, len(self._io)):
            self._promote_into(target)
        for tier in range(len(self._io)):
            self._retain(tier)

    def _listed(self, tier: int) -> set[int]:
        """The committed steps of a tier; while it cannot be listed, the last listing plus what we committed."""
        try:
            steps = set(self._io[tier].steps())
        except Exception as exc:  # noqa: BLE001 - an unreachable tier must not stop the others' work
            log.warning("%s: cannot list steps, using the last known list: %s", self._io[tier].label, describe(exc))
            return set(self._known[tier])
        self._known[tier] = steps
        return steps

    def _wanted(self, target: int) -> list[int]:
        """Steps on faster tiers that tier ``target`` keeps but lacks, oldest first."""
        have = self._listed(target)
        offered: set[int] = set()
        for tier in range(target):
            offered.update(self._listed(tier))
        candidates = sorted(offered - have)
        ranked = sorted(have | set(candidates), reverse=True)
        newer = {s: i for i, s in enumerate(ranked)}
        return [s for s in candidates if self.tiers[target].wants(s, newer[s])]

    def _promote_into(self, target: int) -> None:
        io = self._io[target]
        wanted = self._wanted(target)
        if wanted:
            try:
                self._hold(target)
            except Exception as exc:  # noqa: BLE001 - reported like any failed promotion, retried at the next
                self._promotion_failed(target, wanted[0], exc)
                return
        for step in wanted:
            error: BaseException | None = None
            manifest: Manifest | None = None
            for attempt in range(self._attempts):
                if attempt:
                    time.sleep(self._backoff * 2 ** (attempt - 1))
                try:
                    manifest = self._copy_to(target, step)
                except Exception as exc:  # noqa: BLE001 - retried, then reported
                    error = exc
                    log.warning("promoting step %d to %s, try %d of %d: %s", step, io.label, attempt + 1,
                                self._attempts, describe(exc))
                    continue
                error = None
                break
            if error is not None:
                self._promotion_failed(target, step, error)
                return
            if manifest is None:  # retention removed it from the faster tiers meanwhile: no longer wanted
                continue
            self._remember(target, manifest)
            self._known[target].add(step)
            handle = self._handles.get(step)
            if handle is not None:
                handle._set(io.label, TierResult("committed", nbytes=manifest.nbytes))
            self._retain(target)
        with self._lock:
            handles = list(self._handles.values())
        for handle in handles:
            if handle._results[io.label].status == "pending" and handle.done():
                handle._set(io.label, TierResult("skipped"))

    def _copy_to(self, target: int, step: int) -> Manifest | None:
        """Copy ``step`` to tier ``target`` from the fastest tier that has it; None if none has it any more."""
        io = self._io[target]
        for source in range(target):
            with self._using(source, step):
                if not self._io[source].is_committed(step):
                    continue
                previous = self._previous(target, step)
                try:
                    with self._using(target, previous.step) if previous is not None else nullcontext():
                        manifest = copy_step(self._io[source], io, step, previous, self._pool, self._threads)
                except CheckpointError:
                    if io.is_committed(step):  # another writer committed it first: it stands
                        return io.manifest(step)
                    raise
                try:
                    self._io[source].mark_known_good(step)
                except OSError as exc:  # the copy stands; only the record of a verified step is missing
                    log.warning("%s: could not record step %d as verified: %s", self._io[source].label, step,
                                describe(exc))
                return manifest
        return None

    def _promotion_failed(self, target: int, step: int, exc: BaseException) -> None:
        io = self._io[target]
        error = CheckpointError(f"{io.label}: promoting step {step} failed after {self._attempts} tries: "
                                f"{describe(exc)} (it is retried at the next save or promote())")
        error.__cause__ = exc
        log.error("%s", error)
        with self._lock:
            self._failures.append((None, error))
            handles = list(self._handles.values())
        for handle in handles:
            if handle._results[io.label].status == "pending" and handle.done():
                handle._set(io.label, TierResult("failed", describe(exc)))

    def _retain(self, tier: int) -> None:
        io = self._io[tier]
        if not self._keeper.holds(tier):  # only the job writing a tier deletes from it
            return
        try:
            with self._tier_locks[tier]:  # nobody starts reading a step of this tier meanwhile
                steps = io.steps()
                with self._lock:
                    protected = {s for (t, s), n in self._in_use.items() if t == tier and n > 0}
                known_good = io.last_known_good()
                if known_good is not None:
                    protected.add(known_good)
                for slower in range(tier + 1, len(self._io)):
                    protected.update(self._wanted(slower))
                for step in self.tiers[tier].doomed(steps, protected):
                    io.delete(step)
                    log.info("%s: retention deleted step %d", io.label, step)
        except Exception as exc:  # noqa: BLE001 - retention is retried after the next commit
            log.warning("%s: retention failed: %s", io.label, describe(exc))

    @contextmanager
    def _using(self, tier: int, step: int) -> Iterator[None]:
        """Keep retention off ``step`` of ``tier`` while in the block (check it still exists inside)."""
        with self._tier_locks[tier], self._lock:
            self._in_use[(tier, step)] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use[(tier, step)] -= 1
                if not self._in_use[(tier, step)]:
                    del self._in_use[(tier, step)]

    def _hold(self, tier: int) -> None:
        """Take (or keep) the lease of ``tier`` on rank 0; when newly taken, remove what dead writers left there.

        The first tier's is taken by ``save``, the others' by the promotion
        into them, so a slower tier that is down never stops a save.

        Raises:
            CheckpointError: another live job holds the tier's lease.
        """
        if self._rank == 0 and self._keeper.acquire(tier):
            self._remove_debris(self._io[tier])

    def _remove_debris(self, io: TierIO) -> None:
        try:
            for name in io.debris():
                io.remove_debris(name)
                log.info("%s: removed %s, left by a writer that died", io.label, name)
        except Exception as exc:  # noqa: BLE001 - leftovers are harmless: never listed as steps
            log.warning("%s: could not remove leftovers: %s", io.label, describe(exc))

    def promote(self) -> None:
        """Copy now every step that a slower tier keeps but lacks; raise what failed.

        In a multi-rank job every rank calls it; rank 0 copies, the others
        return when it is done.

        Raises:
            CheckpointError: a promotion failed after every retry (on rank 0).
        """
        self._check_open()
        self._saver.submit(lambda: None).result()
        if self._rank == 0:
            self._promoter.submit(self._promote_all).result()
        if self._sharded is not None:
            self._sharded.agree("promote(): waiting for rank 0's promotions", None)
        self._raise_failures()

    # -- restoring ------------------------------------------------------------------

    def _select(self, tiers: Sequence[str | int] | None) -> list[int]:
        if tiers is None:
            return list(range(len(self._io)))
        chosen = []
        for tier in tiers:
            if isinstance(tier, int) and 0 <= tier < len(self._io):
                chosen.append(tier)
                continue
            matches = [i for i, t in enumerate(self.tiers) if t.label == tier]
            if not matches:
                raise ValueError(f"no tier {tier!r}; tiers are {[t.label for t in self.tiers]}")
            chosen.append(matches[0])
        return sorted(set(chosen))

    def steps(self) -> dict[str, list[int]]:
        """The committed steps of each tier, oldest first."""
        return {io.label: io.steps() for io in self._io}

    def latest(self, tiers: Sequence[str | int] | None = None) -> int | None:
        """The newest step committed on any (of the given) tiers, or None."""
        found = [max(s) for s in (self._io[i].steps() for i in self._select(tiers)) if s]
        return max(found) if found else None

    def restore(self, step: int | None = None, *, into: Any = None, keys: Sequence[str] | None = None,
                tiers: Sequence[str | int] | None = None, repair: bool = False) -> Any:
        """The saved state of ``step`` (default: the newest committed on any tier).

        Reads each file from the fastest tier holding the step and checks its
        size and xxh3-128; a missing or damaged file is read from the next
        tier instead (and rewritten on the faster one with ``repair=True``).
        Returns the state type for type. With ``into``, tensors and arrays
        at the same places are filled in place and objects get
        ``load_state_dict``. ``keys`` restores only those sub-trees
        ("model", "optimizer/state"). A :class:`PerRank` comes back as this
        rank's own value, still wrapped.

        Raises:
            CheckpointError: no such step, a file is damaged on every tier, or
                the step holds PerRank values saved by another world size.
        """
        state, _ = self.restore_with_report(step, into=into, keys=keys, tiers=tiers, repair=repair)
        return state

    def restore_with_report(self, step: int | None = None, *, into: Any = None, keys: Sequence[str] | None = None,
                            tiers: Sequence[str | int] | None = None,
                            repair: bool = False) -> tuple[Any, ReadReport]:
        """:meth:`restore`, and what it read, fell back on and repaired."""
        self._check_open()
        chosen = self._select(tiers)
        if step is None:
            step = self.latest(chosen) if self._rank == 0 else None
            if self._sharded is not None:
                step = self._sharded.agree("restore: agreeing on the newest step", step)
            if step is None:
                raise CheckpointError(f"no committed step on {[self.tiers[i].label for i in chosen]}")
        holders = [i for i in chosen if self._io[i].is_committed(step)]
        if not holders:
            raise CheckpointError(f"step {step} is committed on none of {[self.tiers[i].label for i in chosen]}; "
                                  f"committed steps: {self.steps()}")
        with ExitStack() as using:
            for i in holders:
                using.enter_context(self._using(i, step))
            holders = [i for i in holders if self._io[i].is_committed(step)]
            if not holders:
                raise CheckpointError(f"step {step} was deleted by retention while the restore began")
            reader = StepReader([self._io[i] for i in holders], step, self._pool, self._threads, repair=repair,
                                rank=self._rank, world=self._sharded.world if self._sharded is not None else 1)
            state = reader.load(list(keys) if keys else None, into)
        whole = not keys and self._sharded is None  # a rank of a multi-rank job may read only its shards
        if whole and not any(k.startswith(f"{reader.source.label}:") for k in reader.report.fell_back):
            try:
                reader.source.mark_known_good(step)
            except Exception as exc:  # noqa: BLE001 - a read-only tier still restores
                log.warning("%s: could not record step %d as verified: %s", reader.source.label, step,
                            describe(exc))
        return state, reader.report

    # -- lifecycle ------------------------------------------------------------------

    def _raise_failures(self) -> None:
        with self._lock:
            failures = [e for h, e in self._failures if h is None or not h.reported]
            self._failures.clear()
        if failures:
            if len(failures) > 1:
                raise CheckpointError(f"{failures[0]} (and {len(failures) - 1} more failure(s): "
                                      + "; ".join(str(e) for e in failures[1:]) + ")") from failures[0].__cause__
            raise failures[0]

    def wait(self) -> None:
        """Wait for every save and promotion in flight; raise what failed and was not yet reported."""
        self._saver.submit(lambda: None).result()
        self._promoter.submit(lambda: None).result()
        self._raise_failures()

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
            self._saver.shutdown(wait=True)
            self._promoter.shutdown(wait=True)
            self._pool.shutdown(wait=True)
            self._keeper.close()
            if self._sharded is not None:
                self._sharded.close()

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


BACKGROUND_NICE = 10
"""How much lower than the training loop's the background threads' CPU priority is (Linux)."""


def _lower_priority() -> None:
    """Let the training loop's threads win the CPU from this background thread (Linux: per-thread nice)."""
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + BACKGROUND_NICE))
    except (AttributeError, OSError):  # not Linux, or not allowed: run at the normal priority
        pass
