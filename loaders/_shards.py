"""Writing record batches into numbered Arrow IPC shard files on a store, hashed as they are written."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Literal

import pyarrow as pa
import pyarrow.ipc as ipc

from trainio.storage import Hasher, LocalStore, Store, StoreError
from trainio.storage._atomic import make_dirs, publish, temp_name, write_all

from ._index import SHARD_DIR, BatchInfo, ShardInfo

if TYPE_CHECKING:
    from typing_extensions import Buffer

Compression = Literal["lz4", "zstd"] | None
_MAGIC_BYTES = 8  # "ARROW1" and two bytes of padding open every IPC file


class _HashingSink(io.RawIOBase):
    """Where pyarrow writes a shard: every byte is hashed and counted on its way to the file."""

    def __init__(self, raw: io.FileIO) -> None:
        super().__init__()
        self._raw = raw
        self.hasher = Hasher()
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Buffer) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        write_all(self._raw, view)
        self.position += view.nbytes
        return view.nbytes


class _OpenShard:
    """One shard file being written: the IPC writer, its sink and what the index will say of it."""

    def __init__(self, key: str, path: str, schema: pa.Schema, compression: Compression) -> None:
        self.key = key
        self.path = path
        self.file = io.FileIO(path, "wb")
        self.sink = _HashingSink(self.file)
        self.writer = ipc.new_file(pa.PythonFile(self.sink, mode="w"), schema,
                                   options=ipc.IpcWriteOptions(compression=compression))
        self.batches: list[BatchInfo] = []
        self.rows = 0
        # pyarrow writes the magic and the schema message with the first batch, so that batch's
        # message starts after them.
        self._first_offset = _MAGIC_BYTES + schema.serialize().size

    def write(self, batch: pa.RecordBatch) -> None:
        start = self.sink.position if self.batches else self._first_offset
        self.writer.write_batch(batch)
        self.batches.append(BatchInfo(self.rows, start, self.sink.position - start))
        self.rows += batch.num_rows

    def finish(self, durable: bool) -> ShardInfo:
        self.writer.close()
        if durable:
            os.fsync(self.file.fileno())
        self.file.close()
        return ShardInfo(path=self.key, rows=self.rows, bytes=self.sink.position,
                         xxh3_128=self.sink.hasher.hexdigest(), batches=tuple(self.batches))

    def discard(self) -> None:
        self.file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class ShardSequenceWriter:
    """Writes record batches into shard files ``shards/<prefix><NNNNN>.arrow`` of one store, in order.

    A shard is closed once it reaches ``shard_bytes`` (so it may exceed it by
    up to one batch). Each shard is written to a temp file, hashed as it is
    written, and becomes visible under its key only when complete: renamed in
    place on a local store, uploaded (streamed) elsewhere. It writes no index:
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
        self._local = store if isinstance(store, LocalStore) else None
        self._staging = (os.fspath(self._local.root / SHARD_DIR) if self._local
                         else tempfile.mkdtemp(prefix="trainio-shards-"))

    @property
    def shards(self) -> list[ShardInfo]:
        """The shards finished so far."""
        return list(self._done)

    def write(self, batch: pa.RecordBatch) -> None:
        """Append one record batch (of this writer's schema) to the current shard."""
        if self._open is None:
            key = f"{SHARD_DIR}/{self._name_prefix}{len(self._done):05d}.arrow"
            make_dirs(self._staging, durable=False)
            self._open = _OpenShard(key, os.path.join(self._staging, temp_name()), self._schema, self._compression)
        self._open.write(batch)
        if self._open.sink.position >= self._shard_bytes:
            self._finish()

    def close(self) -> list[ShardInfo]:
        """Finish the last shard and return every shard written, in order."""
        if self._open is not None:
            self._finish()
        self._cleanup_staging()
        return list(self._done)

    def abort(self) -> None:
        """Discard the shard in progress and delete the finished ones."""
        if self._open is not None:
            self._open.discard()
            self._open = None
        for shard in self._done:
            self._store.delete(shard.path)
        self._done.clear()
        self._cleanup_staging()

    def _finish(self) -> None:
        shard, self._open = self._open, None
        assert shard is not None
        try:
            info = shard.finish(durable=self._local is not None and self._local.options.durable)
            if self._local is not None:
                durable = self._local.options.durable
                publish(shard.path, os.fspath(self._local.path_of(info.path)), overwrite=True, durable=durable)
            else:
                uploaded = self._store.put_file(info.path, shard.path)
                os.unlink(shard.path)
                if uploaded != info.xxh3_128:
                    raise StoreError(self._store.url, info.path,
                                     f"uploaded bytes hash to {uploaded}, written ones to {info.xxh3_128}",
                                     "the local staging file changed during the upload")
        except BaseException:
            shard.discard()
            raise
        self._done.append(info)

    def _cleanup_staging(self) -> None:
        if self._local is None:
            shutil.rmtree(self._staging, ignore_errors=True)
