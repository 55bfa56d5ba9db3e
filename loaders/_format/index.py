"""The dataset index: ``index.json``, its model, its JSON form and its validation."""

from __future__ import annotations

import base64
import bisect
import os
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pyarrow as pa

from trainio.storage import (
    MAX_DOCUMENT_BYTES,
    SEAL_FIELD,
    FormatError,
    InvalidKey,
    NotFound,
    Store,
    check_key,
    is_sealed,
    load_sealed,
    parse_json,
    seal_json,
)

FORMAT_NAME = "trainio.dataset"
FORMAT_VERSION = 2
"""The version this trainio writes: 2 seals ``index.json`` (``document_xxh3_128``); version 1 is still read."""
INDEX_KEY = "index.json"
SHARD_DIR = "shards"
COMPRESSIONS = (None, "lz4", "zstd")
READ_VERSIONS = (1, 2)
MAX_INDEX_BYTES = MAX_DOCUMENT_BYTES

_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def shard_key(number: int) -> str:
    """The key of shard ``number`` inside a dataset: ``shards/shard-00042.arrow``."""
    return f"{SHARD_DIR}/shard-{number:05d}.arrow"


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """Where one record batch of a shard is.

    Attributes:
        first_row: Index, within the shard, of the batch's first row.
        offset: Byte offset of the batch's encapsulated IPC message in the shard file.
        length: Byte length of that message (metadata and body).
    """

    first_row: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class RowDigests:
    """A shard's row digests file: the XXH3-64 of every row of each of ``fields`` (see FORMAT.md).

    Attributes:
        path: Its key in the dataset.
        fields: The fields it covers, in the schema's order (every field of the schema).
        xxh3_128: The XXH3-128 digest of the whole file.
    """

    path: str
    fields: tuple[str, ...]
    xxh3_128: str

    def size(self, rows: int) -> int:
        """The file's size in bytes, for a shard of ``rows`` rows."""
        return 8 * rows * len(self.fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardInfo:
    """One shard file of a dataset, as the index records it (with its row digests file, where it has one)."""

    path: str
    rows: int
    bytes: int
    xxh3_128: str
    batches: tuple[BatchInfo, ...] = field(default=())
    row_xxh3: RowDigests | None = None

    @property
    def files(self) -> tuple[str, ...]:
        """The keys of the shard's files: the shard, and its row digests file where it has one."""
        return (self.path,) if self.row_xxh3 is None else (self.path, self.row_xxh3.path)

    def batch_of(self, row: int) -> int:
        """The number of the batch holding ``row`` (0 <= row < rows)."""
        return bisect.bisect_right([b.first_row for b in self.batches], row) - 1

    def batch_rows(self, number: int) -> int:
        """How many rows batch ``number`` holds."""
        end = self.batches[number + 1].first_row if number + 1 < len(self.batches) else self.rows
        return end - self.batches[number].first_row


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetIndex:
    """What ``index.json`` says: the schema, the row count and every shard.

    ``shard_offsets[i]`` is the global index of shard ``i``'s first row, with
    one more entry for the total.
    """

    schema: pa.Schema
    rows: int
    shards: tuple[ShardInfo, ...]
    compression: str | None = None
    created_by: str = ""
    shard_offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        offsets = [0]
        for shard in self.shards:
            offsets.append(offsets[-1] + shard.rows)
        object.__setattr__(self, "shard_offsets", tuple(offsets))

    def locate(self, row: int) -> tuple[int, int]:
        """(shard number, row within that shard) of the global ``row``."""
        shard = bisect.bisect_right(self.shard_offsets, row) - 1
        return shard, row - self.shard_offsets[shard]

    def to_json(self) -> bytes:
        """The index as the UTF-8 JSON document ``index.json`` holds."""
        document = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "created_by": self.created_by or _created_by(),
            "rows": self.rows,
            "compression": self.compression,
            "schema": {
                "arrow_ipc_base64": base64.b64encode(self.schema.serialize().to_pybytes()).decode("ascii"),
                "fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in self.schema],
            },
            "shards": [_shard_json(s) for s in self.shards],
        }
        return seal_json(document, indent=1)

    @classmethod
    def from_json(cls, data: bytes, *, url: str) -> DatasetIndex:
        """Parse and validate ``index.json`` of the dataset at ``url``.

        A sealed index (version 2) has its seal checked over the bytes before
        it is parsed; an unsealed one is accepted only as version 1.

        Raises:
            FormatError: naming the field that is wrong: a seal that does not
                match (or a version-2 index without one), not JSON, nested too
                deep, another
                format or a newer version, a shard path outside the
                dataset, counts or batch tables that do not add up.
        """
        return _Parser(url).parse(data)


def _shard_json(shard: ShardInfo) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": shard.path,
        "rows": shard.rows,
        "bytes": shard.bytes,
        "xxh3_128": shard.xxh3_128,
        "batches": [[b.first_row, b.offset, b.length] for b in shard.batches],
    }
    if shard.row_xxh3 is not None:
        entry["row_xxh3"] = {"path": shard.row_xxh3.path, "fields": list(shard.row_xxh3.fields),
                             "xxh3_128": shard.row_xxh3.xxh3_128}
    return entry


def load_index(store: Store) -> tuple[DatasetIndex, bytes]:
    """The dataset index of ``store`` and its exact bytes: read bounded in size, its seal checked, validated.

    Only a regular file inside the store's root is read (a FIFO is refused
    without blocking, a link out of the root is refused).

    Raises:
        NotFound: there is no ``index.json`` (no dataset, or an unfinished write).
        FormatError: it is too large, damaged (seal), or malformed, naming the field.
        StoreError: it cannot be read (a symbolic link leading out of the root, say).
    """
    try:
        size = store.size(INDEX_KEY)
        if size > MAX_INDEX_BYTES:
            raise FormatError(store.url, INDEX_KEY, f"is {size} bytes, more than the {MAX_INDEX_BYTES} an index may have",
                              "this is not a trainio index")
        raw = store.get(INDEX_KEY)
    except NotFound as exc:
        local = store.local_path(INDEX_KEY)
        if local is not None and os.path.lexists(local):
            raise  # there is something, but not a regular file: the error says what
        raise NotFound(store.url, INDEX_KEY, "no dataset here: index.json is missing",
                       "a dataset exists only once its writer has closed; re-run the writer") from exc
    return DatasetIndex.from_json(raw, url=store.url), raw


def _created_by() -> str:
    try:
        return f"trainio {version('trainio')}"
    except PackageNotFoundError:
        return "trainio"


class _Parser:
    """Validation of one index document; every error names the field."""

    def __init__(self, url: str) -> None:
        self.url = url

    def fail(self, where: str, problem: str, hint: str = "") -> FormatError:
        return FormatError(self.url, INDEX_KEY, f"{where}: {problem}" if where else problem,
                           hint or "the index is damaged or was edited by hand: re-shard the dataset")

    def parse(self, data: bytes) -> DatasetIndex:
        sealed = is_sealed(data)
        # A seal is checked over the bytes before anything is parsed; without one the document is parsed
        # (bounded in size and depth) only to learn that it is an unsealed version-1 index.
        document = load_sealed(data, self.url, INDEX_KEY) if sealed else parse_json(data, self.url, INDEX_KEY)
        if not isinstance(document, dict):
            raise self.fail("", "is not a JSON object")
        if SEAL_FIELD in document:
            raise self.fail(SEAL_FIELD, "is not 32 lowercase hex digits closing the document: the index is damaged",
                            "restore index.json from a good copy or re-shard the dataset")
        if document.get("format") != FORMAT_NAME:
            raise self.fail("format", f"is {document.get('format')!r}, not {FORMAT_NAME!r}",
                            "this is not a trainio dataset")
        ver = self.integer(document, "version", "version")
        if ver not in READ_VERSIONS:
            raise self.fail("version", f"is {ver}; this trainio reads versions {READ_VERSIONS}",
                            "upgrade trainio" if ver > FORMAT_VERSION else "")
        if ver >= 2 and not sealed:
            raise self.fail("", f"a version-{ver} index must end with its {SEAL_FIELD!r} member, and this one has "
                                "none: it is damaged, truncated or was edited by hand",
                            "restore index.json from a good copy or re-shard the dataset")
        compression = document.get("compression")
        if compression not in COMPRESSIONS:
            raise self.fail("compression", f"is {compression!r}, not one of {COMPRESSIONS}")
        schema = self.schema(document.get("schema"))
        raw_shards = document.get("shards")
        if not isinstance(raw_shards, list):
            raise self.fail("shards", "must be a list")
        shards = tuple(self.shard(i, raw) for i, raw in enumerate(raw_shards))
        paths = [s.path for s in shards] + [s.row_xxh3.path for s in shards if s.row_xxh3 is not None]
        if len(set(paths)) != len(paths):
            raise self.fail("shards", "lists one shard file more than once")
        for i, shard in enumerate(shards):
            if shard.row_xxh3 is not None and list(shard.row_xxh3.fields) != schema.names:
                raise self.fail(f"shards[{i}].row_xxh3.fields", f"are {list(shard.row_xxh3.fields)}, not the "
                                                                 f"schema's fields {schema.names}")
        rows = self.integer(document, "rows", "rows")
        if rows != sum(s.rows for s in shards):
            raise self.fail("rows", f"is {rows} but the shards hold {sum(s.rows for s in shards)} rows")
        created_by = document.get("created_by", "")
        return DatasetIndex(schema=schema, rows=rows, shards=shards, compression=compression,
                            created_by=created_by if isinstance(created_by, str) else "")

    def integer(self, obj: dict[str, Any], name: str, where: str) -> int:
        value = obj.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.fail(where, f"must be a non-negative integer, not {value!r}")
        return value

    def schema(self, raw: object) -> pa.Schema:
        if not isinstance(raw, dict) or not isinstance(raw.get("arrow_ipc_base64"), str):
            raise self.fail("schema.arrow_ipc_base64", "is missing")
        try:
            return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(raw["arrow_ipc_base64"], validate=True)))
        except (ValueError, pa.ArrowException) as exc:
            raise self.fail("schema.arrow_ipc_base64", f"is not a serialized Arrow schema ({exc})") from exc

    def shard(self, i: int, raw: object) -> ShardInfo:
        where = f"shards[{i}]"
        if not isinstance(raw, dict):
            raise self.fail(where, "must be an object")
        path = self.shard_path(f"{where}.path", raw.get("path"))
        rows = self.integer(raw, "rows", f"{where}.rows")
        size = self.integer(raw, "bytes", f"{where}.bytes")
        digest = self.digest(f"{where}.xxh3_128", raw.get("xxh3_128"))
        batches = self.batches(where, raw.get("batches"), rows, size)
        row_xxh3 = self.row_digests(f"{where}.row_xxh3", raw["row_xxh3"]) if "row_xxh3" in raw else None
        return ShardInfo(path=path, rows=rows, bytes=size, xxh3_128=digest, batches=batches, row_xxh3=row_xxh3)

    def shard_path(self, where: str, path: object) -> str:
        try:
            check_key(self.url, path)
        except InvalidKey as exc:
            raise self.fail(where, f"{path!r} is not a path inside the dataset ({exc.problem})",
                            "refusing to read outside the dataset") from exc
        assert isinstance(path, str)
        if not path.startswith(f"{SHARD_DIR}/") or path == INDEX_KEY:
            raise self.fail(where, f"{path!r} is not under {SHARD_DIR}/",
                            "refusing to read outside the dataset's shard directory")
        return path

    def digest(self, where: str, digest: object) -> str:
        if not isinstance(digest, str) or not _HEX32.match(digest):
            raise self.fail(where, f"{digest!r} is not 32 lowercase hex digits")
        return digest

    def row_digests(self, where: str, raw: object) -> RowDigests:
        if not isinstance(raw, dict):
            raise self.fail(where, "must be an object")
        fields = raw.get("fields")
        if not isinstance(fields, list) or not all(isinstance(name, str) for name in fields):
            raise self.fail(f"{where}.fields", "must be a list of field names")
        return RowDigests(self.shard_path(f"{where}.path", raw.get("path")), tuple(fields),
                          self.digest(f"{where}.xxh3_128", raw.get("xxh3_128")))

    def batches(self, where: str, raw: object, rows: int, size: int) -> tuple[BatchInfo, ...]:
        if not isinstance(raw, list):
            raise self.fail(f"{where}.batches", "must be a list of [first_row, offset, length]")
        result: list[BatchInfo] = []
        for j, item in enumerate(raw):
            spot = f"{where}.batches[{j}]"
            if (not isinstance(item, list) or len(item) != 3
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in item)):
                raise self.fail(spot, f"{item!r} is not [first_row, offset, length] of non-negative integers")
            batch = BatchInfo(*item)
            if result and batch.first_row <= result[-1].first_row:
                raise self.fail(spot, "rows do not increase from the previous batch")
            if result and batch.offset < result[-1].offset + result[-1].length:
                raise self.fail(spot, "overlaps the previous batch")
            if batch.offset + batch.length > size or batch.length == 0:
                raise self.fail(spot, f"bytes [{batch.offset}, {batch.offset + batch.length}) "
                                      f"are not inside the shard's {size} bytes")
            result.append(batch)
        if rows and (not result or result[0].first_row != 0 or result[-1].first_row >= rows):
            raise self.fail(f"{where}.batches", f"do not cover the shard's {rows} rows")
        return tuple(result)


