"""The zarr v3 layout of one checkpoint step: arrays, chunks and metadata documents.

Arrays are chunked so that every chunk is one contiguous byte range of the
C-ordered array (dimensions before the split have chunk length 1, those after
it are whole), which lets chunk files be written straight from, and read
straight into, the array's memory. Chunk keys use zarr's default encoding with
the "." separator (``c.0.0``), so a chunk is a file beside its ``zarr.json``.
Metadata documents are made by zarr's own metadata classes.

Arrays are uncompressed unless the manager is given a ``compression``
("zstd" or "zstd:<level>"); compressed chunks are zstd frames of the padded
chunk, as zarr's ``zstd`` codec writes them, so any zarr v3 reader decodes them.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .boxes import grid_chunks
from .dtypes import storage_numpy_dtype

ROOT = "state.zarr"
"""The zarr group of a step, relative to the step's directory."""

CHUNK_BYTES = 32 << 20
"""Default largest chunk: big enough that per-file costs vanish, small enough to spread over writers."""

PACK_BYTES = 256 << 10
"""Default size up to which an array is stored in the step's pack rather than as its own zarr array."""

RANK_PACK_BYTES = 8 << 20
"""Default size up to which a sharded array's largest shard has its chunks stored in the rank packs of the ranks that
write them (see FORMAT.md, "Rank packs"), not a file per chunk: a rank then reads a few big files, which a cold disk
streams faster than many files of a few MiB."""

PACK_PATH = ".packed"
"""The pack: a 1-D uint8 zarr array holding the small arrays of a step back to back.

Creating thousands of tiny files every step is slow (and on ext4 much slower
right after retention deleted thousands), so arrays of at most ``pack_bytes``
live in one array. A plain zarr reader sees it as ``.packed``; its
attribute ``trainio.packed`` maps each member's path to its byte ``offset``,
``dtype`` (the true type), ``stored`` (its zarr data type) and ``shape``.
"""


RANK_PACKS = ".rank_packs"
"""The group of the rank packs (version 4): one 1-D uint8 array a pack, ``<rank:06d>.<n>``."""


def stored_groups(arrays: list[ArraySpec]) -> list[str]:
    """Every group with a ``zarr.json`` of a step whose arrays (the pack excluded) are ``arrays``: those the arrays
    stored alone live in, and the rank packs' group when some array is ranked."""
    groups = group_paths([s.path for s in arrays if s.stored_alone])
    return groups + [RANK_PACKS] if any(s.ranked for s in arrays) else groups


def chunk_key(path: str, index: tuple[int, ...]) -> str:
    """The key, relative to the step, of chunk ``index`` of the array at ``path``."""
    return f"{ROOT}/{path}/" + ".".join(["c", *map(str, index)])


_ZSTD = re.compile(r"zstd(?::(-?\d+))?")
_DEFAULT_ZSTD_LEVEL = 3


def parse_compression(text: str | None) -> str | None:
    """The canonical form of a compression setting ("zstd:3"), or None for uncompressed.

    Raises:
        ValueError: it is not "zstd" or "zstd:<level>" with a level from -7 to 22.
    """
    if text is None or text == "none":
        return None
    match = _ZSTD.fullmatch(text) if isinstance(text, str) else None
    level = int(match.group(1)) if match and match.group(1) is not None else _DEFAULT_ZSTD_LEVEL
    if match is None or not -7 <= level <= 22:
        raise ValueError(f"compression {text!r} is not supported: use None, 'zstd' or 'zstd:<level>' "
                         "with a level from -7 to 22")
    return f"zstd:{level}"


def _codec_level(codec: str) -> int:
    return int(codec.split(":")[1])


def encode_chunk(codec: str, data: memoryview, size: int) -> bytes:
    """The file of one chunk compressed with ``codec``: ``data`` padded with zeros to ``size`` bytes."""
    from numcodecs.zstd import Zstd  # type: ignore[import-untyped]

    if data.nbytes < size:
        padded = bytearray(size)
        padded[:data.nbytes] = data
        data = memoryview(padded)
    return bytes(Zstd(level=_codec_level(codec)).encode(data))


def chunk_shape(shape: tuple[int, ...], itemsize: int, target_bytes: int) -> tuple[int, ...]:
    """The chunk shape of an array: at most ``target_bytes`` (or one element), each chunk contiguous."""
    return grid_chunks(shape, itemsize, target_bytes, [])


@dataclass(frozen=True)
class ChunkFile:
    """One chunk's file: its key under the step, and where its bytes lie in the array.

    Attributes:
        key: The file's key relative to the step ("state.zarr/model/w/c.0.0").
        start: Offset of the chunk's first byte in the C-ordered array.
        length: Bytes of the array in the chunk.
        size: Bytes of the chunk (more than ``length`` for an edge chunk, padded with
            zeros); a compressed chunk's file is smaller.
    """

    key: str
    start: int
    length: int
    size: int


@dataclass(frozen=True)
class ArraySpec:
    """One array of a step as the manifest records it.

    Attributes:
        path: Its path in the zarr group.
        kind: What restore returns: ``"torch"``, ``"numpy"`` or ``"numpy_scalar"``.
        dtype: The true element type ("bfloat16").
        stored: The zarr data type of the stored array ("uint16").
        shape: The array's shape.
        chunks: Its chunk shape.
        packed: Its byte offset in the step's pack, or None when it is an array of its own.
        codec: Its compression ("zstd:3"), or None when its chunks are stored raw.
        ranked: Its chunks are byte ranges of the rank packs of the ranks that wrote them (small shards of a
            sharded array, version 4), not files; it has no ``zarr.json``.
    """

    path: str
    kind: str
    dtype: str
    stored: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    packed: int | None = None
    codec: str | None = None
    ranked: bool = False

    @property
    def stored_alone(self) -> bool:
        """Whether the array is a zarr array of its own, with a ``zarr.json`` and chunk files."""
        return self.packed is None and not self.ranked

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return storage_numpy_dtype(self.stored).itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the array's elements."""
        return math.prod(self.shape) * self.itemsize

    @property
    def metadata_key(self) -> str:
        """The key of the array's ``zarr.json`` relative to the step."""
        return f"{ROOT}/{self.path}/zarr.json"

    def chunk_files(self) -> list[ChunkFile]:
        """Every chunk file of the array, in C order of the chunk grid (none for a packed array)."""
        if self.packed is not None:
            return []
        return _chunk_files(self.path, self.shape, self.chunks, self.itemsize)

    def metadata(self) -> bytes:
        """The array's ``zarr.json`` document."""
        return _array_metadata(self.shape, self.chunks, self.stored, self.dtype, self.codec)

    def to_json(self) -> dict[str, Any]:
        """The manifest's record of the array."""
        record: dict[str, Any] = {"kind": self.kind, "dtype": self.dtype, "stored": self.stored,
                                  "shape": list(self.shape), "chunks": list(self.chunks)}
        if self.packed is not None:
            record["packed"] = self.packed
        if self.codec is not None:
            record["codec"] = self.codec
        if self.ranked:
            record["ranked"] = True
        return record


@functools.lru_cache(maxsize=4096)
def _chunk_files(path: str, shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int) -> list[ChunkFile]:
    if any(n == 0 for n in shape):
        return []
    grid = [-(-n // c) for n, c in zip(shape, chunks, strict=True)]
    strides = [itemsize] * len(shape)
    for dim in range(len(shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * shape[dim + 1]
    chunk_bytes = math.prod(chunks) * itemsize
    files: list[ChunkFile] = []
    for index in _grid_indices(grid):
        start = sum(i * c * s for i, c, s in zip(index, chunks, strides, strict=True))
        # Chunks are contiguous: only the split dimension (the last one with a
        # partial chunk length) can end early, at the array's edge.
        length = chunk_bytes
        for dim in range(len(shape)):
            if index[dim] * chunks[dim] + chunks[dim] > shape[dim]:
                length = (shape[dim] - index[dim] * chunks[dim]) * chunk_bytes // chunks[dim]
                break
        suffix = ".".join(["c", *map(str, index)])
        files.append(ChunkFile(f"{ROOT}/{path}/{suffix}", start, length, chunk_bytes))
    return files


def _grid_indices(grid: list[int]) -> list[tuple[int, ...]]:
    indices: list[tuple[int, ...]] = [()]
    for n in grid:
        indices = [(*prefix, i) for prefix in indices for i in range(n)]
    return indices


def pack_spec(nbytes: int, chunk_bytes: int, codec: str | None = None) -> ArraySpec:
    """The pack of a step holding ``nbytes``."""
    return ArraySpec(PACK_PATH, "pack", "uint8", "uint8", (nbytes,), (max(1, min(nbytes, chunk_bytes)),),
                     codec=codec)


def pack_metadata(pack: ArraySpec, members: list[ArraySpec]) -> bytes:
    """The pack's ``zarr.json``, its attributes saying where each member lies."""
    document = json.loads(pack.metadata())
    document["attributes"]["trainio"]["packed"] = {
        m.path: {"offset": m.packed, "dtype": m.dtype, "stored": m.stored, "shape": list(m.shape)} for m in members}
    return json.dumps(document, separators=(",", ":")).encode()


def rank_pack_metadata(nbytes: int, members: dict[str, tuple[ArraySpec, tuple[int, ...], int]]) -> bytes:
    """A rank pack's ``zarr.json``: a 1-D uint8 array of one chunk, whose attribute ``trainio.ranked`` says, for any
    zarr reader, which chunk of which array lies where in it (by chunk key: the array's path, type, shape and chunk
    shape, the chunk's grid index, and its offset and size in the pack)."""
    document = json.loads(pack_spec(nbytes, max(1, nbytes)).metadata())
    document["attributes"]["trainio"]["ranked"] = {
        key: {"path": spec.path, "dtype": spec.dtype, "stored": spec.stored, "shape": list(spec.shape),
              "chunks": list(spec.chunks), "index": list(index), "offset": offset,
              "size": math.prod(spec.chunks) * spec.itemsize}
        for key, (spec, index, offset) in sorted(members.items())}
    return json.dumps(document, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=4096)
def _array_metadata(shape: tuple[int, ...], chunks: tuple[int, ...], stored: str, dtype: str,
                    codec: str | None) -> bytes:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.dtype import get_data_type_from_native_dtype
    from zarr.core.metadata.v3 import ArrayV3Metadata

    data_type = get_data_type_from_native_dtype(storage_numpy_dtype(stored))
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}
                                    if data_type.to_native_dtype().itemsize > 1 else {"name": "bytes"}]
    if codec is not None:
        codecs.append({"name": "zstd", "configuration": {"level": _codec_level(codec), "checksum": False}})
    attributes: dict[str, Any] = {"trainio": {"dtype": dtype}}
    metadata = ArrayV3Metadata(
        shape=shape,
        data_type=data_type,
        chunk_grid={"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        chunk_key_encoding={"name": "default", "configuration": {"separator": "."}},
        fill_value=data_type.default_scalar(),
        codecs=codecs,
        attributes=attributes,
        dimension_names=None,
    )
    return bytes(metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())


@functools.lru_cache(maxsize=1)
def group_metadata() -> bytes:
    """The ``zarr.json`` of every group of the layout."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import GroupMetadata

    return bytes(GroupMetadata().to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())


def group_paths(array_paths: list[str]) -> list[str]:
    """Every group the arrays live in, parents first ("" is the root)."""
    groups = {""}
    for path in array_paths:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            groups.add("/".join(parts[:i]))
    return sorted(groups, key=lambda g: (g.count("/") + (g != ""), g))


def group_metadata_key(group: str) -> str:
    """The key of a group's ``zarr.json`` relative to the step."""
    return f"{ROOT}/{group}/zarr.json" if group else f"{ROOT}/zarr.json"
