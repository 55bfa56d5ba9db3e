"""Promotion from a node tier: every rank uploads its own part in parallel, rank 0 commits the root.

Run on every rank, in the promotion lane (a process group of its own, in a
thread of its own, so it never interleaves with a save's exchanges):

1. each rank reads its own part (its part manifest and files; rank 0 also the
   root's files) from its node's directory, each file checked, and writes it
   into the target tier's writer of the step (the name rank 0 chose), linking
   files equal to the target's previous step; makes them durable and checks
   they are in place;
2. rank 0 gathers the outcomes and, when every rank succeeded, commits the
   node's root manifest on the target (its files and every part checked);
3. rank 0 tells every rank the outcome.

No byte of the step passes through another rank.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from trainio.storage import CheckpointError

from .._format.manifest import MANIFEST, FileEntry, Manifest
from .._format.parts import part_key
from .._tiers.commit import StepWriter, TierIO, describe, step_name
from .._tiers.node_tier import NodeTierIO
from .collective import Exchange
from .files import _File, put_files


def _own_files(manifest: Manifest, rank: int) -> dict[str, FileEntry]:
    """The files of ``rank``'s part of the step, its part manifest included (rank 0: the root's files too)."""
    files: dict[str, FileEntry] = {}
    parts = manifest.parts or []
    entry = parts[rank] if rank < len(parts) else None
    if entry is not None:
        files[part_key(rank)] = entry
        files.update(manifest.files.part(rank))  # type: ignore[attr-defined]
    if rank == 0:
        files.update(manifest.own_files)
    return files


def promote_part(collective: Exchange, source: NodeTierIO, target: TierIO, step: int, name: str | None,
                 previous: Manifest | None, pool: ThreadPoolExecutor, threads: int) -> int:
    """Promote ``step`` from the node tier to ``target``; every rank calls it. The step's bytes (rank 0).

    Raises:
        CheckpointError: a rank failed (on every rank, naming it); nothing is committed on ``target``.
    """
    rank = collective.rank
    writer: StepWriter | None = None
    document = b""
    written: dict[str, FileEntry] = {}
    nbytes = 0
    report: str | None = None
    try:
        manifest = source.manifest(step)
        nbytes = manifest.nbytes
        if rank == 0:
            document = source.store.get(f"{step_name(step)}/{MANIFEST}")
        listed = _own_files(manifest, rank)

        def reader(key: str, entry: FileEntry) -> Callable[[], memoryview]:
            return lambda: memoryview(source.read(step, key, entry))

        writer = target.writer(step, name)
        files = [_File(key, entry.size, reader(key, entry)) for key, entry in listed.items()]
        written = put_files(writer, files, previous, pool, threads, {key: e.xxh3 for key, e in listed.items()})
        writer.flush()
        writer.check(written)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the promotion everywhere
        report = f"rank {rank}: {describe(exc)}"
    what = f"promoting step {step} to {target.label}"
    reports = collective.gather(what, report, background="promote")
    verdict: str | None = None
    if reports is not None:
        failed = [r for r in reports if r]
        if not failed and writer is not None:
            try:
                root = Manifest.from_bytes(document, source.url, f"{step_name(step)}/{MANIFEST}")
                parts = {part_key(r): e for r, e in enumerate(root.parts or []) if e is not None}
                writer.commit(document, {**root.own_files, **parts})
            except Exception as exc:  # noqa: BLE001 - the promotion's failure on every rank
                failed.append(f"rank 0: {describe(exc)}")
        if failed and writer is not None:
            writer.abort()
        verdict = "; ".join(failed) if failed else None
    verdict = collective.broadcast(what, verdict, background="promote")
    if verdict:
        raise CheckpointError(f"{target.label}: {what} failed: {verdict}")
    return nbytes
