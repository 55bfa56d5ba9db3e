"""The tiers of one manager: promotion from tier to tier, retention, leases, leftovers, steps in use.

Everything here runs on the committing rank (rank 0), in the background
threads, except :meth:`TierSet.using`, which a restore also takes so that
retention leaves the step it reads alone, and :meth:`TierSet.hold`, which a
node's first rank also takes for its directory of a node tier.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

from trainio.storage import CheckpointError

from .._format.manifest import Manifest
from .._handle import SaveLedger, TierResult
from .._restore.device_reads import DeviceReads
from .._restore.report import ReadReport
from .._restore.step_reader import StepReader
from .._save.files import copy_step
from .._tier import Tier
from .commit import TierIO, describe
from .lease import LeaseKeeper

log = logging.getLogger("trainio.checkpoint._manager")


class TierSet:
    """The tiers of one manager, fastest first, and the bookkeeping that spans them."""

    def __init__(self, tiers: list[Tier], io: list[TierIO], ledger: SaveLedger, keeper: LeaseKeeper, *,
                 rank: int, pool: ThreadPoolExecutor, threads: int, attempts: int, backoff_s: float,
                 gpu_direct: str = "auto") -> None:
        self._tiers = tiers
        self._io = io
        self._ledger = ledger
        self._keeper = keeper
        self._rank = rank
        self._pool = pool
        self._threads = threads
        self._attempts = attempts
        self._backoff = backoff_s
        self._device = DeviceReads(gpu_direct, buffers=threads + 2)  # restores into CUDA tensors; pins memory lazily
        self._lock = threading.Lock()
        self._in_use: Counter[tuple[int, int]] = Counter()
        self._newest: list[Manifest | None] = [None] * len(io)  # the last manifest each tier committed
        self._known: list[set[int]] = [set() for _ in io]
        self._tier_locks = [threading.RLock() for _ in io]
        self._metric_values: dict[tuple[int, int], dict[str, float]] = {}  # (tier, step): its manifest's metrics

    def previous(self, tier: int, step: int) -> Manifest | None:
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

    def remember(self, tier: int, manifest: Manifest) -> None:
        """Keep ``manifest`` as the newest one committed on ``tier`` (for the next incremental save)."""
        self._metric_values[(tier, manifest.step)] = dict(manifest.metrics)
        newest = self._newest[tier]
        if newest is None or manifest.step > newest.step:
            self._newest[tier] = manifest

    def promote_all(self) -> None:
        """Copy every step that a slower tier keeps but lacks, then apply every tier's retention."""
        for target in range(1, len(self._io)):
            self._promote_into(target)
        for tier in range(len(self._io)):
            self.retain(tier)

    def _listed(self, tier: int) -> set[int]:
        """The committed steps of a tier; while it cannot be listed, the last listing plus what we committed."""
        try:
            steps = set(self._io[tier].steps())
        except Exception as exc:  # noqa: BLE001 - an unreachable tier must not stop the others' work
            log.warning("%s: cannot list steps, using the last known list: %s", self._io[tier].label, describe(exc))
            return set(self._known[tier])
        self._known[tier] = steps
        return steps

    def _wanted(self, target: int, offered: set[int] | None = None) -> list[int]:
        """Steps on faster tiers (or ``offered``) that tier ``target`` keeps but lacks, oldest first."""
        have = self._listed(target)
        offered = set(offered or ())
        for tier in range(target):
            offered.update(self._listed(tier))
        candidates = sorted(offered - have)
        ranked = sorted(have | set(candidates), reverse=True)
        rule = self._tiers[target]
        if rule.metric is not None:  # what its retention would keep of all of them, by their metric
            metrics = self._metrics(target, have) or {}
            for step in candidates:
                source = next((t for t in range(target) if step in self._listed(t)), None)
                if source is not None:
                    metrics.update(self._metrics(source, {step}, rule.metric) or {})
            doomed = set(rule.doomed(ranked, (), metrics))
            return [s for s in candidates if s not in doomed]
        newer = {s: i for i, s in enumerate(ranked)}
        return [s for s in candidates if rule.wants(s, newer[s])]

    def _promote_into(self, target: int) -> None:
        io = self._io[target]
        wanted = self._wanted(target)
        seen = max((max(self._known[t], default=-1) for t in range(target + 1)), default=-1)
        if wanted:
            try:
                self.hold(target)
            except Exception as exc:  # noqa: BLE001 - reported like any failed promotion, retried at the next
                self.promotion_failed(target, wanted[0], exc)
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
                self.promotion_failed(target, step, error)
                return
            if manifest is None:  # retention removed it from the faster tiers meanwhile: no longer wanted
                continue
            self.remember(target, manifest)
            self.promoted(target, step, manifest.nbytes)
        self._ledger.settle_tier(io.label, "skipped", up_to=seen)

    def promoted(self, target: int, step: int, nbytes: int) -> None:
        """Record ``step`` committed on tier ``target`` by a promotion, and apply that tier's retention."""
        self._known[target].add(step)
        self._ledger.record(step, self._io[target].label, TierResult("committed", nbytes=nbytes))
        self.retain(target)

    def from_nodes(self, on_nodes: set[int]) -> list[tuple[int, int, str | None]]:
        """For a node tier first: each (step, further tier, writers' name) to promote, oldest first by tier.

        Only steps some node still holds (``on_nodes``); a tier whose lease
        cannot be taken is reported failed and skipped.
        """
        wanted: list[tuple[int, int, str | None]] = []
        for target in range(1, len(self._io)):
            steps = [s for s in self._wanted(target, on_nodes) if s in on_nodes]
            if not steps:
                continue
            try:
                self.hold(target)
            except Exception as exc:  # noqa: BLE001 - reported like any failed promotion, retried at the next
                self.promotion_failed(target, steps[0], exc)
                continue
            wanted.extend((step, target, self._io[target].shared_name(step)) for step in steps)
        return wanted

    def settle_promotions(self, failed: set[int]) -> None:
        """Settle every handle still waiting on a further tier that did not fail: the tier did not want it."""
        for target in range(1, len(self._io)):
            if target not in failed:
                self._ledger.settle_tier(self._io[target].label, "skipped")

    def _copy_to(self, target: int, step: int) -> Manifest | None:
        """Copy ``step`` to tier ``target`` from the fastest tier that has it; None if none has it any more."""
        io = self._io[target]
        for source in range(target):
            with self.using(source, step):
                if not self._io[source].is_committed(step):
                    continue
                previous = self.previous(target, step)
                try:
                    with self.using(target, previous.step) if previous is not None else nullcontext():
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

    def promotion_failed(self, target: int, step: int, exc: BaseException) -> None:
        """Report that promoting ``step`` to tier ``target`` failed (it is retried at the next promotion)."""
        io = self._io[target]
        error = CheckpointError(f"{io.label}: promoting step {step} failed after {self._attempts} tries: "
                                f"{describe(exc)} (it is retried at the next save or promote())")
        error.__cause__ = exc
        log.error("%s", error)
        self._ledger.fail(None, error)
        self._ledger.settle_tier(io.label, "failed", describe(exc))

    def retain(self, tier: int) -> None:
        """Delete what ``tier``'s retention does not keep: never its newest or last verified step, one in use,
        or one a slower tier still waits for; only on tiers whose lease this job holds."""
        io = self._io[tier]
        if not self._keeper.holds(tier):  # only the job writing a tier deletes from it
            return
        try:
            with self._tier_locks[tier]:  # nobody starts reading a step of this tier meanwhile
                for step in self.doomed(tier):
                    io.delete(step)
                    self._metric_values.pop((tier, step), None)
                    log.info("%s: retention deleted step %d", io.label, step)
        except Exception as exc:  # noqa: BLE001 - retention is retried after the next commit
            log.warning("%s: retention failed: %s", io.label, describe(exc))

    def doomed(self, tier: int, adding: int | None = None) -> list[int]:
        """The steps ``tier``'s retention deletes now (with ``adding`` counted as committed): never its newest,
        its last verified one, one in use, or one a slower tier still waits for."""
        io = self._io[tier]
        steps = set(io.steps()) | ({adding} if adding is not None else set())
        with self._lock:
            protected = {s for (t, s), n in self._in_use.items() if t == tier and n > 0}
        known_good = io.last_known_good()
        if known_good is not None:
            protected.add(known_good)
        for slower in range(tier + 1, len(self._io)):
            protected.update(self._wanted(slower))
        return self._tiers[tier].doomed(steps, protected, self._metrics(tier, steps))

    def _metrics(self, tier: int, steps: set[int], metric: str | None = None) -> dict[int, float] | None:
        """Each step's value of ``metric`` (default: the one ``tier`` keeps its best steps by), read from the
        tier's manifests (and kept); steps whose manifest cannot be read or lacks it are left out. None when there is
        no metric to rank by."""
        metric = metric or self._tiers[tier].metric
        if metric is None:
            return None
        found = {}
        for step in steps:
            if (tier, step) not in self._metric_values:
                try:
                    values = self._io[tier].manifest(step).metrics
                except Exception as exc:  # noqa: BLE001 - an unreadable step is not ranked, not lost
                    log.warning("%s: step %d is not ranked by %s: %s", self._io[tier].label, step, metric,
                                describe(exc))
                    continue
                self._metric_values[(tier, step)] = values
            value = self._metric_values[(tier, step)].get(metric)
            if value is not None:
                found[step] = value
        return found

    @contextmanager
    def using(self, tier: int, step: int) -> Iterator[None]:
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

    def hold(self, tier: int, before_cleaning: Callable[[], None] | None = None) -> None:
        """Take (or keep) the lease of ``tier`` where this rank commits on it (rank 0; a node's first rank on a
        node tier); when newly taken, run ``before_cleaning``, then remove what dead writers left there.

        The first tier's is taken by ``save``, the others' by the promotion
        into them, so a slower tier that is down never stops a save.

        Raises:
            CheckpointError: another live job holds the tier's lease.
        """
        if tier >= len(self._keeper):
            return
        taken = self._keeper.acquire(tier)
        if before_cleaning is not None:
            before_cleaning()
        if taken:
            self._remove_debris(self._io[tier])

    def _remove_debris(self, io: TierIO) -> None:
        try:
            for name in io.debris():
                io.remove_debris(name)
                log.info("%s: removed %s, left by a writer that died", io.label, name)
        except Exception as exc:  # noqa: BLE001 - leftovers are harmless: never listed as steps
            log.warning("%s: could not remove leftovers: %s", io.label, describe(exc))

    def select(self, tiers: Sequence[str | int] | None) -> list[int]:
        """The indexes of the tiers named (by label or index), all of them for None.

        Raises:
            ValueError: a name that is no tier's.
        """
        if tiers is None:
            return list(range(len(self._io)))
        chosen = []
        for tier in tiers:
            if isinstance(tier, int) and 0 <= tier < len(self._io):
                chosen.append(tier)
                continue
            matches = [i for i, t in enumerate(self._tiers) if t.label == tier]
            if not matches:
                raise ValueError(f"no tier {tier!r}; tiers are {[t.label for t in self._tiers]}")
            chosen.append(matches[0])
        return sorted(set(chosen))

    def steps(self) -> dict[str, list[int]]:
        """The committed steps of each tier, oldest first."""
        return {io.label: io.steps() for io in self._io}

    def latest(self, chosen: list[int]) -> int | None:
        """The newest step committed on any of the ``chosen`` tiers that can be listed (the others are logged), or
        None."""
        found = []
        for i in chosen:
            try:
                steps = self._io[i].steps()
            except OSError as exc:  # a tier that cannot be read holds nothing to restore
                log.warning("%s: cannot list its steps: %s", self._io[i].label, describe(exc))
                continue
            found.extend(steps[-1:])
        return max(found) if found else None

    def read(self, step: int, chosen: list[int], keys: list[str] | None, into: Any, *, repair: bool, rank: int,
             world: int) -> tuple[Any, ReadReport]:
        """Restore ``step`` from the ``chosen`` tiers that hold it, fastest first (see :class:`StepReader`).

        Retention leaves the step alone meanwhile. A whole single-process
        restore read from its source tier without falling back records the
        step there as the last known good one.

        Raises:
            CheckpointError: no chosen tier holds the step, or a file is damaged on every one.
        """
        holders = [i for i in chosen if self._io[i].is_committed(step)]
        if not holders:
            raise CheckpointError(f"step {step} is committed on none of {[self._tiers[i].label for i in chosen]}; "
                                  f"committed steps: {self.steps()}")
        with ExitStack() as using:
            for i in holders:
                using.enter_context(self.using(i, step))
            holders = [i for i in holders if self._io[i].is_committed(step)]
            if not holders:
                raise CheckpointError(f"step {step} was deleted by retention while the restore began")
            reader = StepReader([self._io[i] for i in holders], step, self._pool, self._threads, repair=repair,
                                rank=rank, world=world, device=self._device)
            state = reader.load(keys, into)
        whole = not keys and world == 1  # a rank of a multi-rank job may read only its shards
        if whole and not any(k.startswith(f"{reader.source.label}:") for k in reader.report.fell_back):
            try:
                reader.source.mark_known_good(step)
            except Exception as exc:  # noqa: BLE001 - a read-only tier still restores
                log.warning("%s: could not record step %d as verified: %s", reader.source.label, step,
                            describe(exc))
        return state, reader.report
