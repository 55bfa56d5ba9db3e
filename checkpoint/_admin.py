"""Working on a tier without a training job: list, verify, copy, clean up, describe."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from trainio.storage import CheckpointError, FormatError, Store, StoreError, digest, open_store

from ._format.manifest import MANIFEST, FileEntry, Manifest
from ._save.files import copy_step
from ._tier import Tier
from ._tiers import open_tier_io
from ._tiers.commit import TierIO, describe, step_name
from ._tiers.lease import Lease, LeaseKeeper
from ._tiers.node_tier import NODE_RECORD, held_files, record_of

Where = str | os.PathLike[str] | Store


ADMIN_LEASE_S = 60.0
"""How long the lease of a command-line writer (promote, gc) lasts unrenewed."""


@contextmanager
def _holding(tier: TierIO) -> Iterator[None]:
    """Hold ``tier``'s lease (renewed) while in the block, as a writing job does."""
    lease = Lease(tier.store, tier.label, ADMIN_LEASE_S)
    keeper = LeaseKeeper([lease], ADMIN_LEASE_S)
    keeper.acquire(0)
    tier.lease = lease
    try:
        yield
    finally:
        tier.lease = None
        keeper.close()


def _tier(where: Where) -> TierIO:
    store = where if isinstance(where, Store) else open_store(where)
    return open_tier_io(store, store.url)


@dataclass(frozen=True)
class StepInfo:
    """One committed step of a tier, from its manifest.

    Attributes:
        step: The step.
        time: When it was saved (seconds since the epoch).
        nbytes: Bytes of its files.
        files: How many files it has.
        arrays: How many arrays it holds.
        verified: Whether it is the tier's last known good step.
        error: Why its manifest could not be read ("" when it could).
        metrics: The numbers saved with it (``save(..., metrics=)``).
    """

    step: int
    time: float
    nbytes: int
    files: int
    arrays: int
    verified: bool
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def list_steps(where: Where) -> list[StepInfo]:
    """The committed steps of one tier, oldest first."""
    tier = _tier(where)
    known_good = tier.last_known_good()
    infos = []
    for step in tier.steps():
        try:
            m = tier.manifest(step)
        except (StoreError, FormatError, CheckpointError) as exc:
            infos.append(StepInfo(step, 0.0, 0, 0, 0, False, describe(exc)))
            continue
        infos.append(StepInfo(step, m.time, m.nbytes, len(m.files) + 1, len(m.arrays), step == known_good,
                              metrics=dict(m.metrics)))
    return infos


def read_manifest(where: Where, step: int | None = None) -> Manifest:
    """The validated manifest of ``step`` (default: the newest) on one tier."""
    tier = _tier(where)
    if step is None:
        steps = tier.steps()
        if not steps:
            raise CheckpointError(f"{tier.url}: no committed step")
        step = steps[-1]
    if not tier.is_committed(step):
        raise CheckpointError(f"{tier.url}: step {step} is not committed; steps: {tier.steps()}")
    return tier.manifest(step)


@dataclass
class VerifyReport:
    """What ``verify_checkpoint`` checked and found.

    Attributes:
        url: The tier.
        steps: The steps checked.
        files: Files re-hashed.
        nbytes: Bytes re-hashed.
        problems: ``(step, file key, what is wrong)`` for each damaged or missing file.
        unrecorded: Why the newest whole step could not be recorded as the
            last known good one ("" when it was, or nothing was whole); the
            verification itself stands.
    """

    url: str
    steps: list[int] = field(default_factory=list)
    files: int = 0
    nbytes: int = 0
    problems: list[tuple[int, str, str]] = field(default_factory=list)
    unrecorded: str = ""

    @property
    def ok(self) -> bool:
        """Whether everything checked is whole."""
        return not self.problems


def verify_checkpoint(where: Where, steps: list[int] | None = None, *, threads: int = 4,
                      progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Re-read every file of ``steps`` (default: all committed) and check sizes and xxh3-128.

    The newest step found whole is recorded as the tier's last known good
    step, which retention never deletes. Verifying needs no write access:
    where that record cannot be written (a full or read-only tier), the
    report says why in ``unrecorded`` and every check still counts.
    """
    tier = _tier(where)
    report = VerifyReport(tier.url, sorted(steps) if steps is not None else tier.steps())
    good: list[int] = []
    with ThreadPoolExecutor(threads) as pool:
        for step in report.steps:
            try:
                manifest = tier.manifest(step)
            except (StoreError, FormatError, CheckpointError) as exc:
                report.problems.append((step, "manifest.json", describe(exc)))
                continue
            try:
                record = record_of(tier, step)  # a node's directory holds only some parts: those it lists
                if record is not None and record.root.xxh3 != digest(tier.store.get(f"{step_name(step)}/{MANIFEST}")):
                    raise CheckpointError(f"{NODE_RECORD} names another root manifest than this step's")
                # a version-3 step's parts are read and checked here
                listed = held_files(manifest, record) if record is not None else dict(manifest.files)
            except (StoreError, FormatError, CheckpointError) as exc:
                report.problems.append((step, "parts", describe(exc)))
                continue

            def check(key: str, step: int = step, listed: dict[str, FileEntry] = listed) -> tuple[str, str]:
                try:
                    tier.verify(step, key, listed[key])
                except (StoreError, OSError) as exc:
                    return key, describe(exc)
                finally:
                    if progress is not None:
                        progress(listed[key].size)
                return key, ""

            found = [(key, problem) for key, problem in pool.map(check, sorted(listed)) if problem]
            report.files += len(listed)
            report.nbytes += manifest.nbytes if record is None else sum(e.size for e in listed.values())
            report.problems.extend((step, key, problem) for key, problem in found)
            if not found:
                good.append(step)
    if good:
        try:
            tier.mark_known_good(max(good))
        except OSError as exc:  # StoreError is one: a full disk, a read-only mount, no permission
            report.unrecorded = f"step {max(good)} could not be recorded as the last known good one: {describe(exc)}"
    return report


def promote_step(source: Where, target: Where, step: int | None = None, *, threads: int = 4) -> Manifest:
    """Copy committed ``step`` (default: the newest) from one tier to another, checking every file.

    Files equal to the target's previous step are linked or copied there
    server-side; the manifest is written last. The target's lease is held
    meanwhile, as any writer holds it.

    Raises:
        CheckpointError: another job holds the target's lease, naming it.
    """
    src, dst = _tier(source), _tier(target)
    if step is None:
        step = read_manifest(source).step
    with _holding(dst):
        earlier = [s for s in dst.steps() if s < step]
        previous = dst.manifest(earlier[-1]) if earlier else None
        with ThreadPoolExecutor(threads) as pool:
            return copy_step(src, dst, step, previous, pool, threads)


@dataclass
class GcReport:
    """What ``collect_garbage`` removed (or would remove, on a dry run)."""

    deleted: list[int] = field(default_factory=list)
    debris: list[str] = field(default_factory=list)


def collect_garbage(where: Where, *, keep_last: int | None = None, keep_every: int | None = None,
                    dry_run: bool = False) -> GcReport:
    """Apply a retention rule to one tier and remove what dead writers left.

    Never deletes the newest step or the last known good one. It takes the
    tier's lease (a dry run too, to tell true leftovers from a live job's
    upload), so it is refused while a job writes the tier.

    Raises:
        CheckpointError: a job holds the tier's lease, naming it.
    """
    tier = _tier(where)
    rule = Tier(tier.url, keep_last=keep_last, keep_every=keep_every)
    with _holding(tier):
        known_good = tier.last_known_good()
        report = GcReport(rule.doomed(tier.steps(), [known_good] if known_good is not None else []), tier.debris())
        if not dry_run:
            for step in report.deleted:
                tier.delete(step)
            for name in report.debris:
                tier.remove_debris(name)
    return report


def walk_tree(manifest: Manifest) -> Iterator[tuple[tuple[str | int, ...], str, Any]]:
    """Every node of a step's state, depth first: its key path, kind, and detail.

    Kinds: ``dict``, ``list``, ``tuple``, ``object`` (detail: the saved
    type's name), ``per_rank`` (detail: the number of ranks; its children's
    keys are the ranks), ``array`` (detail: its :class:`ArraySpec`) and
    ``value`` (detail: the JSON value).
    """
    def walk(node: dict[str, Any], keys: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], str, Any]]:
        kind = node["t"]
        if kind == "array":
            yield keys, "array", manifest.arrays[node["path"]]
        elif kind in ("json", "float"):
            yield keys, "value", node["value"] if kind == "json" else float(node["value"])
        elif kind == "object":
            yield keys, "object", node["type"]
            for sub_keys, sub_kind, detail in walk(node["state"], keys):
                if sub_keys != keys:
                    yield sub_keys, sub_kind, detail
        else:
            children = node["ranks"] if kind == "per_rank" else node["items"]
            yield keys, kind, len(children)
            pairs = children if kind == "dict" else list(enumerate(children))
            for key, child in pairs:
                yield from walk(child, (*keys, key))

    yield from walk(manifest.tree, ())


