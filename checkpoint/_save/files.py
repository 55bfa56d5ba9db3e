"""A step's files written to a tier: a rank's share of a snapshot (see protocol.py), or a copy of a committed step (promotion)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from trainio.storage import CheckpointError, batched, run_all

from .._format.boxes import chunk_box, chunk_bytes_of, chunk_origin, contiguous_run
from .._format.dtypes import storage_numpy_dtype
from .._format.manifest import FileEntry, Manifest
from .._format.parts import rank_pack_key, rank_pack_metadata_key
from .._format.zarr_layout import (
    CHUNK_BYTES,
    ArraySpec,
    chunk_key,
    encode_chunk,
    group_metadata,
    group_metadata_key,
    pack_metadata,
    rank_pack_metadata,
    stored_groups,
)
from .._tiers.commit import StepWriter, TierIO, digest_with_padding
from .plan import PACK_OWNER, Plan, Unit
from .snapshot import Snapshot
from .staging import aligned


@dataclass(frozen=True)
class _File:
    key: str
    size: int
    """The file's size, or for a chunk still to be compressed, the bound used to schedule it."""
    data: Callable[[], memoryview]
    compressed: bool = False


def _bytes_file(key: str, document: bytes) -> _File:
    return _File(key, len(document), lambda: memoryview(document))


def _range_files(spec: ArraySpec, view: memoryview) -> list[_File]:
    files = []
    for chunk in spec.chunk_files():
        part = view[chunk.start:chunk.start + chunk.length]
        files.append(_chunk_file(spec, chunk.key, chunk.size, lambda p=part: p))  # type: ignore[misc]
    return files


def _chunk_file(spec: ArraySpec, key: str, size: int, data: Callable[[], memoryview]) -> _File:
    codec = spec.codec
    if codec is None:
        return _File(key, size, data)
    return _File(key, size, lambda: memoryview(encode_chunk(codec, data(), size)), compressed=True)


def _unit_files(spec: ArraySpec, unit: Unit, held: memoryview) -> list[_File]:
    """The chunk files of one box of a sharded array, from the box's bytes (C order)."""
    block = np.frombuffer(held, storage_numpy_dtype(spec.stored)).reshape(unit.box.shape)
    size = math.prod(spec.chunks) * spec.itemsize
    files = []
    for index in unit.chunks:
        part = chunk_box(index, spec.chunks, spec.shape)
        run = contiguous_run(part, unit.box)
        in_chunk = contiguous_run(part, chunk_origin(index, spec.chunks))
        key = chunk_key(spec.path, index)
        if run is not None and in_chunk is not None and in_chunk[0] == 0:
            start, count = run[0] * spec.itemsize, run[1] * spec.itemsize
            files.append(_chunk_file(spec, key, size, lambda v=held[start:start + count]: v))  # type: ignore[misc]
        else:
            files.append(_chunk_file(spec, key, size, lambda p=part, i=index: memoryview(  # type: ignore[misc]
                chunk_bytes_of(block[p.relative_to(unit.box)], p, spec.chunks, i))))
    return files


def shard_files(plan: Plan, rank: int, snapshot: Snapshot) -> tuple[list[_File], dict[str, tuple[int, int, int]]]:
    """The files of the boxes ``rank`` writes (listed in its part manifest): the chunk files of its boxes, and
    its packs holding the chunks of ranked arrays; and where each such chunk lies (pack number, offset, size)."""
    views = {leaf.path: view for leaf, view in zip(snapshot.leaves, snapshot.views, strict=True)}
    files: list[_File] = []
    ranked: list[tuple[_File, ArraySpec, tuple[int, ...]]] = []  # a chunk of a ranked array, its array, its index
    for unit in plan.owned(rank):
        spec = plan.arrays[unit.path]
        made = _unit_files(spec, unit, views[unit.path])  # one a chunk, in the order of unit.chunks
        if spec.ranked:
            ranked += [(file, spec, index) for file, index in zip(made, unit.chunks, strict=True)]
        else:
            files += made
    packs, members = _rank_packs(rank, ranked)
    return files + packs, members


def _rank_packs(rank: int, ranked: list[tuple[_File, ArraySpec, tuple[int, ...]]]
                ) -> tuple[list[_File], dict[str, tuple[int, int, int]]]:
    """The files of ``rank``'s packs (each its chunk and its ``zarr.json``) holding the chunks ``ranked``, and where
    each chunk lies (pack number, offset, size). Packs hold at most CHUNK_BYTES, as chunks do, so that readers'
    threads share them."""
    members: dict[str, tuple[int, int, int]] = {}
    if not ranked:
        return [], members
    ends = [0]
    for file, _, _ in ranked:
        start = aligned(ends[-1])
        if start + file.size > CHUNK_BYTES and ends[-1]:
            ends.append(0)
            start = 0
        members[file.key] = (len(ends) - 1, start, file.size)
        ends[-1] = start + file.size
    described: list[dict[str, tuple[ArraySpec, tuple[int, ...], int]]] = [{} for _ in ends]
    contents: list[list[tuple[int, _File]]] = [[] for _ in described]
    for file, spec, index in ranked:
        number, offset, _ = members[file.key]
        described[number][file.key] = (spec, index, offset)
        contents[number].append((offset, file))
    files = []
    for n, (end, placed) in enumerate(zip(ends, contents, strict=True)):
        files.append(_bytes_file(rank_pack_metadata_key(rank, n), rank_pack_metadata(end, described[n])))
        files.append(_File(rank_pack_key(rank, n), end, functools.partial(_pack_bytes, end, placed)))
    return files, members


def _pack_bytes(size: int, members: list[tuple[int, _File]]) -> memoryview:
    """A rank pack's bytes: each member's at its offset (an edge chunk's padded with zeros to the chunk's size), made
    only when the pack is written, so that a save holds one pack per writer, not all of them."""
    pack = np.zeros(size, np.uint8)
    for offset, file in members:
        data = np.frombuffer(file.data(), np.uint8)
        pack[offset:offset + data.nbytes] = data  # numpy copies without the GIL
    return pack.data


def root_files(plan: Plan, snapshot: Snapshot) -> list[_File]:
    """The files :data:`PACK_OWNER` writes besides its boxes' (listed in the root manifest): metadata, the pack."""
    own = [spec for spec in plan.arrays.values() if spec.stored_alone]
    files = [_bytes_file(group_metadata_key(g), group_metadata()) for g in stored_groups(list(plan.arrays.values()))]
    files += [_bytes_file(spec.metadata_key, spec.metadata()) for spec in own]
    if plan.pack is not None:
        members = [spec for spec in plan.arrays.values() if spec.packed is not None]
        staged = [(leaf.path, offset) for leaf, offset in zip(snapshot.leaves, snapshot.offsets, strict=True)
                  if snapshot.is_packed(leaf)]
        if staged != [(spec.path, spec.packed) for spec in members]:
            raise CheckpointError(f"rank {PACK_OWNER}'s pack does not follow the plan")  # a bug, not bad input
        files.append(_bytes_file(plan.pack.metadata_key, pack_metadata(plan.pack, members)))
        files.extend(_range_files(plan.pack, snapshot.pack))
    return files


def put_files(writer: StepWriter, files: list[_File], previous: Manifest | None, pool: ThreadPoolExecutor,
              threads: int, digests: dict[str, str] | None = None) -> dict[str, FileEntry]:
    """Write ``files`` (or link those equal to ``previous``'s) and return each one's entry."""
    writer.prepare([f.key for f in files])

    def write_batch(batch: list[_File]) -> list[tuple[str, FileEntry]]:
        done = []
        for file in batch:
            data = None if digests else file.data()
            size = data.nbytes if file.compressed and data is not None else file.size
            digest = digests[file.key] if digests else digest_with_padding(data, size)  # type: ignore[arg-type]
            entry = FileEntry(size, digest)
            if previous is not None and _unchanged(previous, file.key, entry):
                writer.link(previous.step, file.key)
            else:
                writer.write(file.key, data if data is not None else file.data(), size)
            done.append((file.key, entry))
        return done

    jobs = ((lambda b=batch: write_batch(b)) for batch in batched(files, lambda f: f.size))
    entries: dict[str, FileEntry] = {}
    for done in run_all(pool, jobs, threads):
        entries.update(done)
    return entries


def _unchanged(previous: Manifest, key: str, entry: FileEntry) -> bool:
    """Whether ``previous`` has the file ``key`` with the same size and digest (a part it cannot read: no)."""
    try:
        return previous.files.get(key) == entry
    except Exception:  # noqa: BLE001 - an unreadable part of the previous step only costs the linking
        return False


def copy_files(source: TierIO, writer: StepWriter, step: int, listed: dict[str, FileEntry],
               previous: Manifest | None, pool: ThreadPoolExecutor, threads: int) -> dict[str, FileEntry]:
    """Copy the files ``listed`` of committed ``step`` from ``source`` into ``writer``, each checked as it is
    read (or linked where ``previous`` has it unchanged); each one's entry."""

    def reader(key: str, entry: FileEntry) -> Callable[[], memoryview]:
        return lambda: memoryview(source.read(step, key, entry))

    files = [_File(key, entry.size, reader(key, entry)) for key, entry in listed.items()]
    return put_files(writer, files, previous, pool, threads, {key: e.xxh3 for key, e in listed.items()})


def copy_step(source: TierIO, target: TierIO, step: int, previous: Manifest | None,
              pool: ThreadPoolExecutor, threads: int) -> Manifest:
    """Copy committed ``step`` from ``source`` to ``target``, checking every file, manifest last.

    Every file (a version-3 step's part manifests too) is copied as it is,
    checked against the source's manifest; the manifest is written last.

    Raises:
        IntegrityError, NotFound: a source file is damaged or missing; nothing is committed.
    """
    manifest = source.manifest(step)
    listed = dict(manifest.files)  # every file: a version-3 step's parts are read (and checked) here
    writer = target.writer(step)
    try:
        written = copy_files(source, writer, step, listed, previous, pool, threads)
        copied = replace(manifest, files=manifest.own_files)
        writer.commit(copied.to_bytes(), written)
    except BaseException:
        writer.abort()
        raise
    return copied
