"""ShardSetWriter: rows, column batches or Arrow tables in; checked, re-batched, hashed shard files out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from trainio.storage import SchemaMismatch, Store, StoreError

from .._format.convert import column_to_arrow, infer_columns_schema, infer_schema
from .._format.index import COMPRESSIONS, INDEX_KEY, ShardInfo
from .shard_file import Compression, ShardSequenceWriter

_BATCH_BYTES = 16 << 20


class ShardSetWriter:
    """Writes rows into shard files of a dataset without committing it.

    The building block of :class:`DatasetWriter` and of parallel sharding:
    several ShardSetWriters (with distinct ``name_prefix``) may write shards
    of one dataset at once, and one index listing all their shards commits it
    (:func:`commit_dataset`).

    Data is checked against the schema (inferred from the first row or batch
    when not given). What does not fit raises :class:`SchemaMismatch` naming
    the field, the expected type and the row number. Rows given to
    :meth:`write` are buffered and checked a batch at a time, so the error may
    come from a later call (at the latest from :meth:`finish`); the bad row is
    dropped, every other row is kept, and the writer stays usable. A bad
    :meth:`write_batch` or :meth:`write_table` writes none of its rows.
    Small writes are gathered into record batches of ``batch_rows`` rows (or
    16 MiB, when rows are large); :meth:`end_batch` closes one early.

    Args:
        store: Where the dataset's shards go.
        schema: The Arrow schema; inferred from the first data when None.
        shard_bytes: A shard file is closed once it reaches this size.
        batch_rows: Rows per record batch.
        compression: None, "lz4" or "zstd" (Arrow IPC buffer compression).
        name_prefix: Shards are named ``shards/<name_prefix><NNNNN>.arrow``.
    """

    def __init__(
        self,
        store: Store,
        schema: pa.Schema | None = None,
        *,
        shard_bytes: int = 256 << 20,
        batch_rows: int = 1024,
        compression: Compression = None,
        name_prefix: str = "shard-",
    ) -> None:
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes={shard_bytes}: must be >= 1")
        if batch_rows < 1:
            raise ValueError(f"batch_rows={batch_rows}: must be >= 1")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression={compression!r}: must be one of {COMPRESSIONS}")
        self._store = store
        self._name_prefix = name_prefix
        self._shard_bytes = shard_bytes
        self._batch_rows = batch_rows
        self._compression = compression
        self._schema = schema
        self._rows: list[Mapping[str, Any]] = []
        self._buffered_bytes = 0
        self._written = 0
        self._accepted = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._pending_bytes = 0
        self._shards: ShardSequenceWriter | None = None
        self._closed = False

    @property
    def store(self) -> Store:
        """Where the dataset is written."""
        return self._store

    @property
    def schema(self) -> pa.Schema | None:
        """The dataset's schema (None until given or inferred)."""
        return self._schema

    @property
    def rows_written(self) -> int:
        """Rows accepted so far, buffered ones included."""
        return self._accepted + len(self._rows)

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row: a mapping from every field name to its value."""
        self._check_open()
        if self._schema is None:
            self._schema = infer_schema(row)
        self._check_names(row.keys(), self.rows_written)
        self._rows.append(row)
        self._buffered_bytes += sum(_approx_size(v) for v in row.values())
        if len(self._rows) >= self._batch_rows or self._buffered_bytes >= _BATCH_BYTES:
            self._flush_rows()

    def write_batch(self, batch: Mapping[str, Any] | pa.RecordBatch) -> None:
        """Append many rows at once: a mapping of field name to column (list, numpy or Arrow array), or a RecordBatch."""
        self._check_open()
        self._flush_rows()
        if isinstance(batch, pa.RecordBatch):
            self.write_table(pa.Table.from_batches([batch]))
            return
        if self._schema is None:
            self._schema = infer_columns_schema(batch)
        self._check_names(batch.keys(), self._accepted)
        lengths = {len(column) for column in batch.values()}
        if len(lengths) > 1:
            raise SchemaMismatch(next(iter(batch)), "columns of one length", self._accepted,
                                 f"columns of lengths {sorted(lengths)}")
        columns = [column_to_arrow(field, batch[field.name], self._accepted) for field in self._schema]
        self._emit(pa.RecordBatch.from_arrays(columns, schema=self._schema))

    def write_table(self, table: pa.Table) -> None:
        """Append every row of an Arrow table whose columns match the schema by name."""
        self._check_open()
        self._flush_rows()
        if self._schema is None:
            self._schema = table.schema
        self._check_names(table.column_names, self._accepted)
        columns = [column_to_arrow(field, table.column(field.name), self._accepted) for field in self._schema]
        self._emit(pa.Table.from_arrays(columns, schema=self._schema))

    def end_batch(self) -> None:
        """Write the rows gathered so far as one record batch now, even if it holds fewer than ``batch_rows``.

        Call it where one input ends and another begins: the next input's batches
        then start a batch of their own instead of each straddling two (a copy).
        """
        self._check_open()
        self._flush_rows()
        while self._pending_rows:
            self._write_pending()

    @property
    def compression(self) -> Compression:
        """The shards' IPC compression."""
        return self._compression

    def finish(self) -> list[ShardInfo]:
        """Write what is buffered and return every shard written, in order; no index is written."""
        self._check_open()
        self._flush_rows()
        if self._schema is None:
            raise SchemaMismatch("(any)", "at least one row or a schema", -1, "no rows and no schema")
        while self._pending_rows:
            self._write_pending()
        self._closed = True
        return self._shard_writer().close()

    def abort(self) -> None:
        """Give up: delete the shards written so far; no dataset appears."""
        if self._closed:
            return
        self._closed = True
        if self._shards is not None:
            self._shards.abort()

    # -- internals ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(self._store.url, INDEX_KEY, "the writer is closed")

    def _check_names(self, names: Any, row: int) -> None:
        assert self._schema is not None
        given = list(names)
        for field in self._schema:
            if field.name not in given:
                raise SchemaMismatch(field.name, str(field.type), row, "nothing (the field is missing)")
        for name in given:
            if self._schema.get_field_index(name) < 0:
                raise SchemaMismatch(name, "no such field", row, f"a value (the schema has {self._schema.names})")

    def _flush_rows(self) -> None:
        if not self._rows:
            return
        assert self._schema is not None
        rows, self._rows, self._buffered_bytes = self._rows, [], 0
        errors = []
        for field in self._schema:
            try:
                column_to_arrow(field, [r[field.name] for r in rows], self._accepted)
            except SchemaMismatch as exc:
                errors.append(exc)
        if errors:
            first = min(errors, key=lambda e: e.row)
            bad = first.row - self._accepted
            self._rows = rows[bad + 1:]
            self._buffered_bytes = sum(_approx_size(v) for r in self._rows for v in r.values())
            self._emit_rows(rows[:bad])
            raise first
        self._emit_rows(rows)

    def _emit_rows(self, rows: list[Mapping[str, Any]]) -> None:
        if rows:
            assert self._schema is not None
            columns = [column_to_arrow(f, [r[f.name] for r in rows], self._accepted) for f in self._schema]
            self._emit(pa.RecordBatch.from_arrays(columns, schema=self._schema))

    def _emit(self, data: pa.RecordBatch | pa.Table) -> None:
        """Queue checked rows; write them in batches of ``batch_rows`` rows (or 16 MiB, if less)."""
        for batch in data.to_batches() if isinstance(data, pa.Table) else [data]:
            if batch.num_rows:
                self._pending.append(batch)
                self._pending_rows += batch.num_rows
                self._pending_bytes += batch.nbytes
                self._accepted += batch.num_rows
        while self._pending_rows >= self._batch_rows or (self._pending_bytes >= _BATCH_BYTES and self._pending_rows):
            self._write_pending(limit=self._batch_rows)

    def _write_pending(self, limit: int | None = None) -> None:
        """Write the first pending rows as one record batch: at most ``limit`` rows, 16 MiB, and what the current
        shard has room for (so a shard ends within about a row of its size, whatever the batches)."""
        table = pa.Table.from_batches(self._pending, schema=self._schema)
        take = table.num_rows if limit is None else min(limit, table.num_rows)
        average = max(1, self._pending_bytes // max(1, table.num_rows))
        if self._pending_bytes >= _BATCH_BYTES and limit is not None:
            take = max(1, min(take, _BATCH_BYTES // average))
        take = max(1, min(take, self._shard_writer().room() // average))
        head, rest = table.slice(0, take), table.slice(take)
        self._shard_writer().write(head.combine_chunks().to_batches()[0] if head.num_rows else head.to_batches()[0])
        self._written += take
        self._pending = rest.to_batches()
        self._pending_rows = rest.num_rows
        self._pending_bytes = sum(b.nbytes for b in self._pending)

    def _shard_writer(self) -> ShardSequenceWriter:
        if self._shards is None:
            assert self._schema is not None
            self._shards = ShardSequenceWriter(self._store, self._schema, shard_bytes=self._shard_bytes,
                                               compression=self._compression, name_prefix=self._name_prefix)
        return self._shards


def _approx_size(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return 8 * len(value)
    return 8
