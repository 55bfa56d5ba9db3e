"""Writing record batches into numbered Arrow IPC shard files on a store, hashed as they are written, each with
its row digests file where every field is gathered by rows."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from trainio.storage import Store

from .._batch.row_tables import ShardRows
from .._format.index import SHARD_DIR, BatchInfo, RowDigests, ShardInfo

Compression = Literal["lz4", "zstd"] | None
_MAGIC_BYTES = 8  # "ARROW1" and two bytes of padding open every IPC file


class _OpenShard:
    """One shard file being written: the IPC writer, the store's writer under it, and what the index will say."""

    def __init__(self, store: Store, key: str, schema: pa.Schema, compression: Compression) -> None:
        self.key = key
        self.sink = store.open_writer(key, sync=False)  # the sequence syncs its shards together on close
        self.writer = ipc.new_file(pa.PythonFile(self.sink, mode="w"), schema,
                                   options=ipc.IpcWriteOptions(compression=compression))
        self.batches: list[BatchInfo] = []
        self.rows = 0
        self.digests: list[dict[str, np.ndarray]] | None = []  # each batch's row digests; None once one has none
        # pyarrow writes the magic and the schema message with the first batch, so that batch's
        # message starts after them.
        self._first_offset = _MAGIC_BYTES + schema.serialize().size

    def write(self, batch: pa.RecordBatch) -> None:
        start = self.sink.position if self.batches else self._first_offset
        if self.digests is not None:
            digests = ShardRows([batch]).digests()  # here: a thread of its own would wait for the GIL the writes hold
            if digests:
                self.digests.append(digests)
            else:
                self.digests = None
        self.writer.write_batch(batch)
        self.batches.append(BatchInfo(self.rows, start, self.sink.position - start))
        self.rows += batch.num_rows

    def finish(self, store: Store) -> ShardInfo:
        """Close the IPC file and publish it and its row digests under their keys (not yet durably: see
        :meth:`Store.sync`)."""
        self.writer.close()
        digest = self.sink.commit()
        return ShardInfo(path=self.key, rows=self.rows, bytes=self.sink.position, xxh3_128=digest,
                         batches=tuple(self.batches), row_xxh3=self._write_digests(store))

    def _write_digests(self, store: Store) -> RowDigests | None:
        """The row digests file: each field's digests of every row, field after field, as little-endian uint64."""
        if not self.digests:
            return None
        fields = tuple(self.digests[0])
        key = self.key.removesuffix(".arrow") + ".rows"
        sink = store.open_writer(key, sync=False)
        try:
            for name in fields:
                sink.write(np.concatenate([batch[name] for batch in self.digests]).astype("<u8").tobytes())
            return RowDigests(key, fields, sink.commit())
        except BaseException:
            sink.abort()
            raise

    def discard(self) -> None:
        self.sink.abort()


class ShardSequenceWriter:
    """Writes record batches into shard files ``shards/<prefix><NNNNN>.arrow`` of one store, in order.

    A shard is closed once it reaches ``shard_bytes`` (so it may exceed it by
    up to one batch: a caller that cuts batches to :meth:`room` keeps it
    within about a row). Each shard is written through :meth:`Store.open_writer`:
    hashed as it is written, visible under its key only when complete, and
    made durable, all together, by :meth:`close` (a disk flushes many files
    at once faster than one after another). It writes no index:
    :meth:`close` returns the shards for the caller to record.
    """

    def __init__(
        self,
        store: Store,
        schema: pa.Schema,
        *,
        shard_bytes: int,
        compression: Compression = None,
        name_prefix: str = "shard-",
    ) -> None:
        self._store = store
        self._schema = schema
        self._shard_bytes = shard_bytes
        self._compression = compression
        self._name_prefix = name_prefix
        self._done: list[ShardInfo] = []
        self._open: _OpenShard | None = None

    @property
    def shards(self) -> list[ShardInfo]:
        """The shards finished so far."""
        return list(self._done)

    def room(self) -> int:
        """Bytes the current shard may still take before it closes (a new shard's whole size when none is open)."""
        return self._shard_bytes - (self._open.sink.position if self._open is not None else 0)

    def write(self, batch: pa.RecordBatch) -> None:
        """Append one record batch (of this writer's schema) to the current shard."""
        if self._open is None:
            key = f"{SHARD_DIR}/{self._name_prefix}{len(self._done):05d}.arrow"
            self._open = _OpenShard(self._store, key, self._schema, self._compression)
        self._open.write(batch)
        if self._open.sink.position >= self._shard_bytes:
            self._finish()

    def close(self) -> list[ShardInfo]:
        """Finish the last shard, make every shard durable where the store is, and return them in order."""
        if self._open is not None:
            self._finish()
        self._store.sync(key for shard in self._done for key in shard.files)
        return list(self._done)

    def abort(self) -> None:
        """Discard the shard in progress and delete the finished ones."""
        if self._open is not None:
            self._open.discard()
            self._open = None
        for shard in self._done:
            for key in shard.files:
                self._store.delete(key)
        self._done.clear()

    def _finish(self) -> None:
        shard, self._open = self._open, None
        assert shard is not None
        try:
            info = shard.finish(self._store)
        except BaseException:
            shard.discard()
            raise
        self._done.append(info)

