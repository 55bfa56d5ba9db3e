"""DatasetWriter, and the commit protocol of a dataset: shards first, the index last."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import pyarrow as pa

from trainio.storage import AlreadyExists, FormatError, Store, open_store

from .._format.index import INDEX_KEY, SHARD_DIR, DatasetIndex, ShardInfo, load_index
from .shard_file import Compression
from .shard_set import ShardSetWriter

log = logging.getLogger("trainio.loaders.writer")


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a new dataset will be committed, and what it replaces.

    Attributes:
        store: The dataset's store.
        name_prefix: The prefix new shard files must use; it differs from
            every shard of a dataset being replaced, so the old one stays
            whole until the new index replaces its index.
        replacing: Whether a dataset (maybe a damaged one) is there to replace.
        replaced: The shard paths of the dataset being replaced.
    """

    store: Store
    name_prefix: str
    replacing: bool
    replaced: frozenset[str]


def prepare_destination(store: Store, *, overwrite: bool) -> Destination:
    """Get ``store`` ready for a new dataset and say how to name its shards.

    Shard files no index lists (an unfinished or killed write's) are removed.
    An existing dataset is left intact: it is replaced only when the new one
    commits.

    Raises:
        AlreadyExists: a dataset is there and ``overwrite`` is False.
    """
    replaced: frozenset[str] = frozenset()
    replacing = store.exists(INDEX_KEY)
    if replacing:
        if not overwrite:
            raise AlreadyExists(store.url, INDEX_KEY, "a dataset already exists here",
                                "pass overwrite=True (--overwrite) to replace it, or choose another place")
        try:
            replaced = frozenset(key for s in load_index(store)[0].shards for key in s.files)
        except FormatError:
            log.warning("replacing the damaged dataset at %s", store.url)
    leftovers = [key for key in store.list(SHARD_DIR) if key not in replaced]
    for key in leftovers:
        store.delete(key)
    if leftovers:
        log.warning("removed %d shard files at %s left by an unfinished write", len(leftovers), store.url)
    prefix = f"shard-{secrets.token_hex(3)}-" if replacing else "shard-"
    return Destination(store, prefix, replacing, replaced)


def commit_dataset(destination: Destination, schema: pa.Schema, shards: Sequence[ShardInfo],
                   compression: Compression) -> DatasetIndex:
    """Write the index listing ``shards`` (the commit point), then delete the replaced dataset's shards.

    Raises:
        AlreadyExists: another writer committed a dataset there meanwhile.
    """
    index = DatasetIndex(schema=schema, rows=sum(s.rows for s in shards), shards=tuple(shards),
                         compression=compression)
    store = destination.store
    store.put(INDEX_KEY, index.to_json(), overwrite=destination.replacing)
    for path in destination.replaced - {key for s in shards for key in s.files}:
        store.delete(path)
    return index


class DatasetWriter:
    """Writes a trainio dataset: shard files first, ``index.json`` last.

    The dataset exists only once :meth:`close` has written the index, so a
    writer that fails or is killed leaves no dataset — only shard files that
    the next writer to the same place removes. With ``overwrite``, the old
    dataset stays readable until the new index replaces it. Rows are checked
    against the schema as :class:`ShardSetWriter` describes.

    Args:
        url: Where the dataset goes: a local path, ``file://`` or ``s3://`` URL, or a Store.
        schema: The Arrow schema; inferred from the first data when None.
        shard_bytes: A shard file is closed once it reaches this size (default 256 MiB).
        batch_rows: Rows per record batch (default 1024); random access
            reads whole batches, so smaller batches make ``Dataset[i]`` cheaper.
        compression: None, "lz4" or "zstd" (Arrow IPC buffer compression).
        overwrite: Replace a dataset already at ``url``; without it, that is an error.

    Raises:
        AlreadyExists: a dataset is at ``url`` and ``overwrite`` is False.
        ValueError: an option is out of range.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | Store,
        schema: pa.Schema | None = None,
        *,
        shard_bytes: int = 256 << 20,
        batch_rows: int = 1024,
        compression: Compression = None,
        overwrite: bool = False,
    ) -> None:
        store = url if isinstance(url, Store) else open_store(url)
        self._destination = prepare_destination(store, overwrite=overwrite)
        self._shards = ShardSetWriter(store, schema, shard_bytes=shard_bytes, batch_rows=batch_rows,
                                      compression=compression, name_prefix=self._destination.name_prefix)

    @property
    def store(self) -> Store:
        """Where the dataset is written."""
        return self._shards.store

    @property
    def schema(self) -> pa.Schema | None:
        """The dataset's schema (None until given or inferred)."""
        return self._shards.schema

    @property
    def rows_written(self) -> int:
        """Rows accepted so far, buffered ones included."""
        return self._shards.rows_written

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row: a mapping from every field name to its value."""
        self._shards.write(row)

    def write_batch(self, batch: Mapping[str, Any] | pa.RecordBatch) -> None:
        """Append many rows: a mapping of field name to column (list, numpy or Arrow array), or a RecordBatch."""
        self._shards.write_batch(batch)

    def write_table(self, table: pa.Table) -> None:
        """Append every row of an Arrow table whose columns match the schema by name."""
        self._shards.write_table(table)

    def close(self) -> DatasetIndex:
        """Write what is buffered, then the index; return the index. The dataset exists from here on."""
        shards = self._shards.finish()
        assert self._shards.schema is not None
        return commit_dataset(self._destination, self._shards.schema, shards, self._shards.compression)

    def abort(self) -> None:
        """Give up: delete the shards written so far; no dataset appears (an old one stays)."""
        self._shards.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
