"""Reading a committed step back: every file checked, each from the fastest tier that has it whole."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

import numpy as np

from trainio.storage import CheckpointError, StoreError, batched, in_thread, run_all

from .._format.dtensor import is_dtensor
from .._format.manifest import MANIFEST, FileEntry
from .._format.nodes import Node
from .._format.per_rank import for_rank
from .._format.state_tree import array_paths, build, select
from .._format.zarr_layout import ArraySpec
from .._tiers.commit import ADVISE_BELOW, NotKeptHere, TierIO, describe, step_name
from .._tiers.pack_members import PackMembers
from .device_reads import (
    PINNED_HOST,
    DeviceReads,
    DeviceRun,
    device_bytes,
    device_reads,
    fill_from_pack,
    is_cuda_target,
)
from .regions import (
    Read,
    Region,
    check_shard_target,
    decode,
    pack_reads,
    region_finish,
    region_reads,
    shard_region,
    whole_region,
)
from .report import ReadReport
from .targets import Casting, check_dtype, collect_targets, finish_array, host_array
from .tier_manifests import TierManifests

FIRST_READS = 16 << 20
"""Bytes of arrays whose reads a restore starts before it works out the others' (:meth:`StepReader.prepare`)."""
log = logging.getLogger(__name__)


@dataclass
class Load:
    """A restore's reads, prepared (:meth:`StepReader.prepare`): the files to read and where they go."""

    node: Node
    into: Any
    specs: dict[str, ArraySpec]
    regions: dict[str, Region]
    members: dict[str, tuple[Any, np.ndarray[Any, Any]]]
    reads: list[Read]
    wanted: dict[str, list[str]]
    on_device: dict[str, Any]
    """The CUDA tensors read into in place (see :class:`DeviceReads`), by path."""
    in_packs: list[Read] = field(default_factory=list)
    """Reads of chunks of ranked arrays, by chunk key: :meth:`StepReader.resolve` makes them reads of rank packs."""
    later: list[tuple[str, Any]] = field(default_factory=list)
    """Arrays (path, target) whose reads :meth:`StepReader.finish` works out while the first files are read."""


class StepReader:
    """Reads one step from the tiers that hold it, fastest first."""

    def __init__(self, tiers: list[TierIO], step: int, pool: ThreadPoolExecutor, threads: int,
                 *, repair: bool = False, rank: int = 0, world: int = 1, device: DeviceReads | None = None) -> None:
        self.tiers = tiers
        self.rank, self.world = rank, world  # which rank's PerRank values a load restores
        self.step = step
        self.pool = pool
        self.threads = threads
        self.repair = repair
        self.device = device
        self.manifests = TierManifests(tiers, step)
        self.source, self.manifest = self.manifests.source, self.manifests.manifest
        self.report = ReadReport(step)
        self._report_lock = threading.Lock()

    def read_file(self, key: str, target: memoryview | PackMembers | None) -> bytes | None:
        """Fill ``target`` (memory, or a rank pack's members' places) from the first tier whose copy of ``key`` is
        whole; with no target, return the bytes.

        Each tier's copy is checked against that tier's own manifest; a tier
        whose manifest is damaged is not read from.
        """
        failed: list[tuple[TierIO, BaseException]] = []
        for tier in self.tiers:
            try:
                own = self.manifests.own(tier).files.get(key)
                if own is None:
                    raise CheckpointError(f"its manifest of step {self.step} lists no file {key!r}")
            except (StoreError, OSError, CheckpointError) as exc:
                failed.append((tier, exc if isinstance(exc, CheckpointError | NotKeptHere)
                               else CheckpointError(describe(exc))))
                continue  # its manifest or the part listing the file is unreadable: nothing to read or repair here
            try:
                data = None
                if target is None:
                    data = tier.read(self.step, key, own)
                elif isinstance(target, PackMembers):
                    tier.read_members(self.step, key, own, target)
                else:
                    tier.read_into(self.step, key, own, target)
            except (StoreError, OSError, CheckpointError) as exc:
                failed.append((tier, exc))
                continue
            with self._report_lock:
                self.report.count(tier.source_of(key), own.size)
            if failed:
                self._recover(key, own, failed, tier, data, target)
            return data
        raise CheckpointError(f"step {self.step}: file {key!r} is damaged or missing on every tier: "
                              + "; ".join(f"{t.label}: {describe(e)}" for t, e in failed))

    def _recover(self, key: str, entry: FileEntry, failed: list[tuple[TierIO, BaseException]],
                 good: TierIO, data: bytes | None, target: memoryview | PackMembers | None) -> None:
        failed = [(tier, exc) for tier, exc in failed if not isinstance(exc, NotKeptHere)]  # not a fall-back
        for tier, exc in failed:
            name = f"{tier.label}:{MANIFEST if isinstance(exc, CheckpointError) else key}"
            if name not in self.report.fell_back:
                log.warning("checkpoint step %d: %s on %s: %s; read it from %s", self.step, key, tier.label,
                            describe(exc), good.label)
                self.report.fell_back[name] = describe(exc)
        if not self.repair:
            return
        if isinstance(target, PackMembers):
            data = good.read(self.step, key, entry)  # the members' places hold only some of the pack's bytes
        elif data is None:
            assert target is not None
            data = bytes(target) + bytes(entry.size - target.nbytes)
        for tier, exc in failed:
            if isinstance(exc, CheckpointError):  # its manifest is unreadable or differs: nothing to repair against
                continue
            try:
                tier.repair_file(self.step, key, data)
            except (StoreError, OSError) as exc:
                log.warning("checkpoint step %d: could not repair %s on %s: %s", self.step, key, tier.label,
                            describe(exc))
                continue
            self.report.repaired.append(f"{tier.label}:{key}")

    def load(self, keys: list[str] | None, into: Any) -> Any:
        """The state (or the ``keys`` sub-trees of it), ``into`` filled in place.

        A DTensor in ``into`` gets only its own shard, read from the chunks
        that overlap it.
        """
        return self.finish(self.prepare(keys, into, plan_later=True))

    def prepare(self, keys: list[str] | None, into: Any, *, plan_later: bool = False) -> Load:
        """What :meth:`load` reads for ``keys`` and ``into`` (its ``reads`` name every file), before it reads.

        With ``plan_later``, only the first :data:`FIRST_READS` bytes of
        arrays are worked out now; the reads of the others (and of ranked
        arrays: hundreds of small shards) are left for :meth:`finish` to work
        out while the first files are read (a cold disk is then busy from the
        start). Their dtypes and DTensors' shapes are checked now all the same.

        Raises:
            CheckpointError: a tensor or array of ``into`` has another dtype
                than the one saved at its place, and ``into`` is not
                :class:`Casting` (naming the place and both dtypes); a DTensor
                has another global shape than the saved array.
        """
        cast = isinstance(into, Casting)
        into = into.into if isinstance(into, Casting) else into
        node: Node = self.manifest.tree if not keys else select(self.manifest.tree, keys)
        node = for_rank(node, self.rank, self.world, self.manifest.world_size, f"step {self.step}: state")
        specs = {path: self.manifest.arrays[path] for path in array_paths(node)}
        targets: dict[str, Any] = {}
        collect_targets(node, into, targets)
        load = Load(node, into, specs, {}, {}, [], {}, {})
        planned = 0  # bytes of the arrays planned so far
        for path, spec in specs.items():
            target = targets.get(path)
            if target is not None and not cast:
                check_dtype(spec, target, self._where(path))
            if plan_later and (spec.ranked or planned >= FIRST_READS and self._plannable_later(spec, target)):
                if is_dtensor(target):
                    check_shard_target(spec, target, self._where(path))
                load.later.append((path, target))
            else:
                self._plan(load, path, spec, target)
                planned += load.regions[path].host.nbytes if path in load.regions else 0
        pack = self.manifest.pack
        if pack is not None and (load.members or any(specs[path].packed is not None for path in load.on_device)):
            self._add_region(load, pack.path, whole_region(pack, None, np.empty(pack.nbytes, np.uint8)))
        return load

    def _plannable_later(self, spec: ArraySpec, target: Any) -> bool:
        """Whether an array's reads can be worked out while others are read: not a packed array (read from the
        pack, whose read is decided now), nor one read into a CUDA tensor in place (set up before any read)."""
        return spec.packed is None and not (self.device is not None and is_cuda_target(spec, target))

    def _plan(self, load: Load, path: str, spec: ArraySpec, target: Any) -> None:
        """Add to ``load`` what restoring array ``path`` into ``target`` reads, and where it goes."""
        on_cuda = self.device is not None and is_cuda_target(spec, target)
        if on_cuda and spec.packed is not None:  # filled from the pack, copied up once (see finish)
            load.on_device[path] = target
            return
        memory = device_bytes(spec, target) if on_cuda else None  # None: compressed, or not contiguous
        direct = device_reads(spec, memory) if memory is not None else None
        if direct is not None:
            load.on_device[path] = target
            load.reads.extend(direct)
            load.wanted[path] = [key for key, _, _ in direct]
        elif spec.packed is None and is_dtensor(target):
            self._add_region(load, path, shard_region(spec, target, self._where(path)))
        else:
            result, raw = host_array(spec, None if is_dtensor(target) else target)
            if spec.packed is None:
                self._add_region(load, path, whole_region(spec, result, raw))
            else:
                load.members[path] = (result, raw)

    @staticmethod
    def _add_region(load: Load, path: str, region: Region) -> None:
        load.regions[path] = region
        if region.spec.ranked:
            load.in_packs += region_reads(region)
            return
        # The manifest says all a raw array's bytes mean; only zarr decodes a compressed one from its zarr.json.
        metadata: list[Read] = [(region.spec.metadata_key, None, None)] if region.spec.codec is not None else []
        files: list[Read] = [*metadata, *region_reads(region)]
        load.wanted[path] = [key for key, _, _ in files]
        load.reads.extend(files)

    def resolve(self, load: Load) -> None:
        """Turn ``load``'s reads of ranked arrays' chunks into reads of the rank packs that hold them (reading the
        parts that say where): each pack read (and checked) whole once, its members put where they belong
        (:class:`PackMembers`)."""
        load.reads += pack_reads(load.in_packs, self.manifests.member)
        load.in_packs = []

    def _plan_later(self, load: Load, first: list[tuple[Read, int]],
                    hand: Callable[[list[tuple[Read, int]]], None]) -> None:
        """Work out the reads of the arrays :meth:`prepare` left for later (see ``plan_later``), added to ``load``:
        each piece of them handed on (``hand``) with each file's size (about :data:`FIRST_READS` bytes of arrays; the
        ranked arrays last, together: each rank pack is read whole once). The small files of ``first`` and of each
        piece are advised as they come (see :meth:`_advise_small`)."""
        self._advise_small(first)
        known, planned = len(load.reads), 0
        for path, target in sorted(load.later, key=lambda later: load.specs[later[0]].ranked):  # ranked ones last
            self._plan(load, path, load.specs[path], target)
            planned += load.regions[path].host.nbytes if path in load.regions else 0
            if planned >= FIRST_READS and len(load.reads) > known:
                hand(self._advise_small(self._sized(load.reads[known:])))
                known, planned = len(load.reads), 0
        self.resolve(load)
        hand(self._advise_small(self._sized(load.reads[known:])))

    def _sized(self, reads: list[Read]) -> list[tuple[Read, int]]:
        """``reads``, each with its file's size."""
        return [(read, self.manifests.entry(read[0]).size) for read in reads]

    def _advise_small(self, reads: list[tuple[Read, int]]) -> list[tuple[Read, int]]:
        """``reads``, once their small files are advised. Those are read last in their piece, one after another in
        each thread: from a cold disk, each costs a trip to the disk then; asked for now, they are read in while the
        big files stream."""
        small = [read[0] for read, size in reads if size < ADVISE_BELOW and not isinstance(read[1], DeviceRun)]
        if small:
            self.source.advise(self.step, small)
        return reads

    def finish(self, load: Load) -> Any:
        """Read what ``load`` names and build the state from it."""
        self.resolve(load)
        specs, regions, members = load.specs, load.regions, load.members
        contents: dict[str, bytes | None] = {}
        sizes: dict[str, int] = {}
        every: list[Read] = []
        first = self._sized(load.reads)
        # What is left for later is worked out in a thread while the first files are read, and handed over in pieces.
        handed: SimpleQueue[list[tuple[Read, int]] | None] = SimpleQueue()

        def plan_later() -> None:
            try:
                self._plan_later(load, first, handed.put)
            finally:
                handed.put(None)  # also after an error, which later.result() raises

        later = in_thread(plan_later, "trainio-restore-plan")

        def pieces() -> Iterator[list[tuple[Read, int]]]:
            yield first
            while (piece := handed.get()) is not None:
                yield piece
            later.result()  # its error, if it stopped on one

        def all_jobs() -> Iterator[Callable[[], list[tuple[str, bytes | None]]]]:
            for piece in pieces():
                every.extend(read for read, _ in piece)
                sizes.update((read[0], size) for read, size in piece)
                yield from (functools.partial(self._read_batch, batch)
                            for batch in batched([read for read, _ in piece], lambda r: sizes[r[0]]))

        if load.on_device:
            assert self.device is not None
            self.device.begin(load.on_device.values())
        try:
            for done in run_all(self.pool, all_jobs(), self.threads):
                contents.update(done)
        finally:
            wait([later])
            if load.on_device:
                assert self.device is not None
                self.device.finish()
        for path, region in regions.items():
            if region.spec.codec is not None:
                region.host[...] = decode(region.spec, {k: contents[k] for k in load.wanted[path]}, region.box)
        pack = self.manifest.pack
        if pack is not None and pack.path in regions:
            pack_bytes = regions[pack.path].host
            for path, (_, raw) in members.items():
                offset = specs[path].packed
                assert offset is not None
                raw[:] = pack_bytes[offset:offset + specs[path].nbytes]
            fill_from_pack(pack_bytes, {path: (specs[path], target) for path, target in load.on_device.items()
                                        if specs[path].packed is not None})
        self.report.files = len(every)
        self.report.bytes = sum(sizes.values())

        def load_array(path: str, target: Any) -> Any:
            if path in load.on_device:
                return load.on_device[path]
            if path in members:
                return finish_array(specs[path], members[path][0], target, self._where(path))
            value = region_finish(regions[path])
            return value if is_dtensor(value) else finish_array(specs[path], value, target, self._where(path))

        return build(load.node, load_array, load.into)

    def _read_batch(self, batch: list[Read]) -> list[tuple[str, bytes | None]]:
        done: list[tuple[str, bytes | None]] = []
        for key, target, sink in batch:
            if isinstance(target, DeviceRun):
                self._read_to_device(key, target)
                done.append((key, None))
                continue
            data = self.read_file(key, target)
            if sink is not None and data is not None:
                sink(data)  # copied where it belongs now, so a restore holds one chunk per thread, not all
                data = None
            done.append((key, data))
        return done

    def _read_to_device(self, key: str, run: DeviceRun) -> None:
        """Fill ``run`` with the checked file ``key``: by kvikio from the first tier where that is how this restore
        reads and the tier keeps local files, else through a pinned buffer from the first tier that has it whole."""
        device = self.device
        assert device is not None
        tier = self.tiers[0]
        file = tier.local_file(self.step, key) if device.direct else None
        try:
            entry = self.manifests.own(tier).files.get(key) if file is not None else None
        except CheckpointError:
            entry = None
        if file is not None and entry is not None and entry.size == run.nbytes:  # not a padded edge chunk
            try:
                device.read_direct(file, entry, run, tier.url, f"{step_name(self.step)}/{key}")
                with self._report_lock:
                    self.report.count(tier.source_of(key), entry.size)
                    self.report.to_device = device.path
                    self.report.to_device_bytes += entry.size
                return
            except (OSError, CheckpointError) as exc:  # read again below, from the first tier with it whole
                with self._report_lock:
                    self.report.fell_back[f"{tier.label}:{key} ({device.path})"] = describe(exc)
                log.warning("checkpoint step %d: %s on %s through %s: %s; read through host memory", self.step, key,
                            tier.label, device.path, describe(exc))
        buffer = device.take(run.nbytes)
        try:
            self.read_file(key, buffer[:run.nbytes].numpy().data)
        except BaseException:
            device.release(buffer)
            raise
        device.upload(buffer, run)
        with self._report_lock:
            if not self.report.to_device:  # a kvikio read that fell back here keeps its path's name
                self.report.to_device = PINNED_HOST
            self.report.to_device_bytes += run.nbytes

    def _where(self, path: str) -> str:
        return f"step {self.step}: {path}"
