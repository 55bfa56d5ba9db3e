"""Promotion from a node tier: every rank uploads its own part in parallel, rank 0 commits the root.

Run on every rank, in the promotion lane (a process group of its own, in a
thread of its own, so it never interleaves with a save's exchanges):

1. each rank reads the parts rank 0 gave it (its own, or where its own
   node's copy is gone, the replicas its node keeps; one rank also the root's
   files) from its node's directory, each file checked, and writes them into
   the target tier's writer of the step (the name rank 0 chose), linking
   files equal to the target's previous step; makes them durable and checks
   they are in place;
2. rank 0 gathers the outcomes (with the root manifest, from the rank that
   uploaded the root's files) and, when every rank succeeded, commits it on
   the target (its files and every part checked);
3. rank 0 tells every rank the outcome.

No byte of the step passes through another rank.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from trainio.storage import CheckpointError

from .._format.manifest import MANIFEST, FileEntry, Manifest
from .._format.parts import part_key
from .._tiers.commit import StepWriter, TierIO, describe, step_name
from .._tiers.node_tier import NodeTierIO
from .collective import Exchange
from .files import copy_files


def _files_of(manifest: Manifest, parts: list[int], root: bool) -> dict[str, FileEntry]:
    """The files of the ``parts`` of the step, their part manifests included (and with ``root``, the root's)."""
    files: dict[str, FileEntry] = {}
    listed = manifest.parts or []
    for part in parts:
        entry = listed[part]
        if entry is not None:
            files[part_key(part)] = entry
            files.update(manifest.files.part(part))  # type: ignore[attr-defined]
    if root:
        files.update(manifest.own_files)
    return files


def _upload(source: NodeTierIO, writer: StepWriter, step: int, parts: list[int], root: bool,
            previous: Manifest | None, pool: ThreadPoolExecutor, threads: int) -> dict[str, Any]:
    """Copy ``parts`` (and the root's files) of ``step`` from ``source`` into ``writer``; this rank's report."""
    manifest = source.manifest(step)
    report: dict[str, Any] = {"root": source.store.get(f"{step_name(step)}/{MANIFEST}")} if root else {}
    written = copy_files(source, writer, step, _files_of(manifest, parts, root), previous, pool, threads)
    writer.flush()
    writer.check(written)
    return report


def promote_part(collective: Exchange, source: NodeTierIO, target: TierIO, step: int, name: str | None,
                 previous: Manifest | None, pool: ThreadPoolExecutor, threads: int, parts: list[int],
                 root: bool) -> int:
    """Promote ``step`` from the node tier to ``target``; every rank calls it, uploading ``parts`` (and the
    root's files with ``root``) from its node's directory. The step's bytes (on rank 0).

    Raises:
        CheckpointError: a rank failed (on every rank, naming it); nothing is committed on ``target``.
    """
    rank = collective.rank
    writer: StepWriter | None = None
    report: dict[str, Any] = {}
    try:
        writer = target.writer(step, name)
        if parts or root:
            report = _upload(source, writer, step, parts, root, previous, pool, threads)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the promotion everywhere
        report = {"error": f"rank {rank}: {describe(exc)}"}
    what = f"promoting step {step} to {target.label}"
    reports = collective.gather(what, report, background="promote")
    verdict: str | None = None
    nbytes = 0
    if reports is not None:
        failed = [r["error"] for r in reports if "error" in r]
        documents = [r["root"] for r in reports if "root" in r]
        if not failed and writer is not None:
            try:
                if len(documents) != 1:
                    raise CheckpointError(f"{len(documents)} ranks uploaded the root's files, not 1")
                document = documents[0]
                manifest = Manifest.from_bytes(document, source.url, f"{step_name(step)}/{MANIFEST}")
                nbytes = manifest.nbytes
                listed = {part_key(r): e for r, e in enumerate(manifest.parts or []) if e is not None}
                writer.commit(document, {**manifest.own_files, **listed})
            except Exception as exc:  # noqa: BLE001 - the promotion's failure on every rank
                failed.append(f"rank 0: {describe(exc)}")
        if failed and writer is not None:
            writer.abort()
        verdict = "; ".join(failed) if failed else None
    verdict = collective.broadcast(what, verdict, background="promote")
    if verdict:
        raise CheckpointError(f"{target.label}: {what} failed: {verdict}")
    return nbytes
