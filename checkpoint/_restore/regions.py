"""Reading a box of a saved array: the chunks that overlap it, straight into its memory where they are runs of it,
from the rank packs where they lie there, decoded by zarr where they are compressed.

A plain restore reads the whole array's box; a DTensor target reads only its
own shard's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainio.storage import CheckpointError, FormatError

from .._format.boxes import Box, chunk_box, chunk_indices, chunk_origin, contiguous_run
from .._format.dtensor import dtensor_box
from .._format.dtypes import storage_numpy_dtype, torch_dtype
from .._format.zarr_layout import ArraySpec, chunk_key
from .._tiers.pack_members import PackMember, PackMembers
from .device_reads import DeviceRun

Read = tuple[str, memoryview | DeviceRun | PackMembers | None, Callable[[bytes | memoryview], None] | None]
"""A file to read: its key, memory to read it into (host memory, a CUDA tensor's, a rank pack's members' places, or
None), and what to do with its bytes (or None: keep them)."""


@dataclass
class Region:
    """A box of a saved array to read, and host memory laid out as that box.

    Attributes:
        spec: The saved array.
        box: The part of it to read.
        host: Memory of the box's shape and the stored dtype, filled by the read.
        result: What the restore returns for it (the tensor or array behind ``host``, or the DTensor).
        staged: For a DTensor shard that cannot be read into directly (not contiguous,
            not on the CPU): the shard and the tensor behind ``host``, copied into it
            at the end; else None.
    """

    spec: ArraySpec
    box: Box
    host: np.ndarray[Any, Any]
    result: Any
    staged: tuple[Any, Any] | None = None

    @property
    def raw(self) -> np.ndarray[Any, Any]:
        """The host memory's bytes."""
        return self.host.reshape(-1).view(np.uint8)


def whole_region(spec: ArraySpec, result: Any, raw: np.ndarray[Any, Any]) -> Region:
    """The whole of ``spec``, read into ``raw`` (the bytes of ``result``)."""
    return Region(spec, Box.whole(spec.shape), raw.view(storage_numpy_dtype(spec.stored)).reshape(spec.shape), result)


def shard_region(spec: ArraySpec, target: Any, where: str) -> Region:
    """The shard of ``spec`` a DTensor ``target`` holds on this rank.

    Raises:
        CheckpointError: its global shape or dtype is not the saved array's.
    """
    import torch

    check_shard_target(spec, target, where)
    box = dtensor_box(target, where) or Box.whole(spec.shape)
    local = target.to_local()
    direct = local.device.type == "cpu" and local.is_contiguous()
    memory = local.detach() if direct else torch.empty(box.shape, dtype=local.dtype)
    flat = memory.reshape(-1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
    host = raw.view(storage_numpy_dtype(spec.stored)).reshape(box.shape)
    return Region(spec, box, host, target, None if direct else (local, memory))


def check_shard_target(spec: ArraySpec, target: Any, where: str) -> None:
    """Raise :class:`CheckpointError` unless the DTensor ``target``'s global shape and dtype are the saved array's."""
    if tuple(target.shape) != spec.shape or target.dtype != torch_dtype(spec.dtype):
        raise CheckpointError(f"{where}: the checkpoint holds {spec.dtype}{list(spec.shape)}, the target DTensor is "
                              f"{str(target.dtype).removeprefix('torch.')}{list(target.shape)}")


def region_reads(region: Region) -> list[Read]:
    """The chunk files to read for ``region``: into its memory where a chunk is one run of it, else copied in.

    Chunks of a compressed array are kept whole for zarr to decode.
    """
    spec, box = region.spec, region.box
    reads: list[Read] = []
    for index in chunk_indices(box, spec.chunks):
        key = chunk_key(spec.path, index)
        if spec.codec is not None:
            reads.append((key, None, None))
            continue
        whole = chunk_box(index, spec.chunks, spec.shape)
        run = contiguous_run(whole, box) if whole.intersect(box) == whole else None
        in_chunk = contiguous_run(whole, chunk_origin(index, spec.chunks))
        if run is not None and in_chunk is not None and in_chunk[0] == 0:
            start, count = run[0] * spec.itemsize, run[1] * spec.itemsize
            reads.append((key, region.raw.data[start:start + count], None))
        else:
            reads.append((key, None, functools.partial(_place, region, index)))
    return reads


def _place(region: Region, index: tuple[int, ...], data: bytes | memoryview) -> None:
    """Copy the part of chunk ``index`` (its file's bytes) that lies in the region into it."""
    spec, box = region.spec, region.box
    part = chunk_box(index, spec.chunks, spec.shape).intersect(box)
    assert part is not None
    chunk = np.frombuffer(data, storage_numpy_dtype(spec.stored), count=math.prod(spec.chunks)).reshape(spec.chunks)
    region.host[part.relative_to(box)] = chunk[part.relative_to(chunk_origin(index, spec.chunks))]


def region_finish(region: Region) -> Any:
    """Move staged memory to its tensor, and return the region's result."""
    if region.staged is not None:
        import torch

        local, memory = region.staged
        with torch.no_grad():
            local.copy_(memory)
    return region.result


def pack_reads(reads: list[Read], where: Callable[[str], tuple[str, int, int]]) -> list[Read]:
    """``reads`` of chunks that lie in rank packs (``where(key)``: the pack's key, the offset and size there) as one
    read per pack, into its members' places (:class:`PackMembers`)."""
    by_pack: dict[str, list[PackMember]] = {}
    for key, target, sink in reads:
        pack, offset, size = where(key)
        if sink is None:
            assert isinstance(target, memoryview), "a ranked array's chunk is read into host memory"
            member = PackMember(offset, size, target)
        else:
            member = PackMember(offset, size, None, sink)
        by_pack.setdefault(pack, []).append(member)
    return [(pack, PackMembers(members), None) for pack, members in by_pack.items()]


def decode(spec: ArraySpec, contents: dict[str, bytes | None], box: Box | None = None) -> np.ndarray[Any, Any]:
    """The elements of ``box`` (default: all) of a compressed array, decoded by zarr-python from its checked files."""
    import zarr
    from zarr.core.buffer import Buffer
    from zarr.core.buffer.cpu import Buffer as HostBuffer
    from zarr.storage import MemoryStore

    prefix = spec.metadata_key[:-len("zarr.json")]
    files: dict[str, Buffer] = {key[len(prefix):]: HostBuffer.from_bytes(data or b"") for key, data in contents.items()}
    array = zarr.open_array(store=MemoryStore(files, read_only=True), mode="r")
    if tuple(array.shape) != spec.shape or array.dtype != storage_numpy_dtype(spec.stored):
        raise FormatError(prefix, "zarr.json", f"holds {array.dtype}{list(array.shape)}, the manifest "
                          f"says {spec.stored}{list(spec.shape)}")
    selection = (box or Box.whole(spec.shape)).relative_to(Box.whole(spec.shape))
    return np.ascontiguousarray(array[selection])
