"""Dataset: an opened, validated trainio dataset with random access to its rows."""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from trainio.storage import FormatError, LocalStore, NotFound, Store, open_store
from trainio.storage._hashing import check_digest, digest

from ._index import INDEX_KEY, DatasetIndex, ShardInfo

_CACHED_BATCHES = 16
_OPEN_MAPS = 64


class Dataset:
    """A trainio dataset, opened read-only: its index, schema and rows.

    Opening reads and validates ``index.json`` (format, version, every shard
    path inside the dataset, counts that add up). Random access reads only
    the record batches it needs, by the byte ranges the index records:
    memory-mapped for local datasets, ranged GETs for remote ones. A
    whole-shard read (:meth:`read_shard`) verifies the shard's xxh3-128.
    Thread-safe.

    Values come back as numpy where numpy has a type for them: numbers and
    bools as numpy scalars (``take``: 1-D arrays), variable-length lists as
    1-D arrays, fixed-shape tensors as arrays of their shape; strings as
    ``str`` and binary as ``bytes``.

    Raises:
        NotFound: there is no ``index.json`` at ``url`` (no dataset, or an
            unfinished write).
        FormatError: the index is malformed, naming the field.
    """

    def __init__(self, url: str | os.PathLike[str] | Store) -> None:
        self._store = url if isinstance(url, Store) else open_store(url)
        try:
            raw = self._store.get(INDEX_KEY)
        except NotFound as exc:
            raise NotFound(self._store.url, INDEX_KEY, "no dataset here: index.json is missing",
                           "a dataset exists only once its writer has closed; re-run the writer") from exc
        self._index = DatasetIndex.from_json(raw, url=self._store.url)
        self._index_xxh3 = digest(raw)
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._lock = threading.Lock()
        self._batches: OrderedDict[tuple[int, int], pa.RecordBatch] = OrderedDict()
        self._maps: OrderedDict[int, pa.Buffer] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        # The index travels as it was read, so a copy in another process never sees a newer dataset.
        return {"_store": self._store, "_index": self._index, "_index_xxh3": self._index_xxh3}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    @property
    def store(self) -> Store:
        """Where the dataset lives."""
        return self._store

    @property
    def url(self) -> str:
        """The dataset's URL."""
        return self._store.url

    @property
    def index(self) -> DatasetIndex:
        """The validated index."""
        return self._index

    @property
    def index_xxh3(self) -> str:
        """The xxh3-128 of ``index.json``: it changes whenever the dataset does."""
        return self._index_xxh3

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of every shard."""
        return self._index.schema

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        """Per-shard facts: path, rows, bytes, digest, batches."""
        return self._index.shards

    def __len__(self) -> int:
        return self._index.rows

    def __getitem__(self, row: int) -> dict[str, Any]:
        """Row ``row`` (negative counts from the end) as a dict of field name to value."""
        row = self._check_row(row)
        shard, local = self._index.locate(row)
        number = self._index.shards[shard].batch_of(local)
        batch = self.read_batch(shard, number)
        offset = local - self._index.shards[shard].batches[number].first_row
        return {name: _value_at(batch.column(i), offset) for i, name in enumerate(batch.schema.names)}

    def take(self, rows: Sequence[int]) -> dict[str, Any]:
        """The given rows, in the given order, as a dict of field name to column (see the class docstring)."""
        positions = [self._check_row(r) for r in rows]
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for position, row in enumerate(positions):
            shard, local = self._index.locate(row)
            number = self._index.shards[shard].batch_of(local)
            first = self._index.shards[shard].batches[number].first_row
            groups.setdefault((shard, number), []).append((position, local - first))
        pieces: list[pa.RecordBatch] = []
        order: list[int] = []
        for (shard, number), members in groups.items():
            batch = self.read_batch(shard, number)
            pieces.append(batch.take(pa.array([m[1] for m in members], type=pa.int64())))
            order.extend(m[0] for m in members)
        table = pa.Table.from_batches(pieces, schema=self.schema) if pieces else self.schema.empty_table()
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
        table = table.take(pa.array(inverse))
        return {name: _column(table.column(name)) for name in table.column_names}

    def read_batch(self, shard: int, number: int) -> pa.RecordBatch:
        """Record batch ``number`` of shard ``shard``, reading only its bytes (not hash-verified)."""
        with self._lock:
            cached = self._batches.get((shard, number))
            if cached is not None:
                self._batches.move_to_end((shard, number))
                return cached
        info = self._index.shards[shard]
        where = info.batches[number]
        buffer = self._read_range(shard, where.offset, where.length)
        try:
            batch = ipc.read_record_batch(buffer, self.schema)
        except (pa.ArrowException, ValueError) as exc:
            raise FormatError(self.url, info.path, f"record batch {number} at bytes [{where.offset}, "
                              f"{where.offset + where.length}) does not decode ({exc})",
                              "the shard is corrupt or does not match the index: run trainio verify") from exc
        if batch.num_rows != info.batch_rows(number):
            raise FormatError(self.url, info.path, f"record batch {number} has {batch.num_rows} rows, "
                              f"the index says {info.batch_rows(number)}", "run trainio verify")
        with self._lock:
            self._batches[(shard, number)] = batch
            while len(self._batches) > _CACHED_BATCHES:
                self._batches.popitem(last=False)
        return batch

    def read_shard(self, shard: int) -> pa.Table:
        """All of shard ``shard``, after checking its size and xxh3-128 against the index.

        Raises:
            IntegrityError: the shard's bytes are not the ones the index recorded.
            FormatError: its size differs, or it is not an Arrow IPC file of the schema.
        """
        info = self._index.shards[shard]
        data = self._store.get(info.path)
        if len(data) != info.bytes:
            raise FormatError(self.url, info.path, f"is {len(data)} bytes, the index says {info.bytes}",
                              "the shard was truncated or replaced: re-shard or restore it")
        check_digest(self.url, info.path, info.xxh3_128, digest(data))
        table = ipc.open_file(pa.py_buffer(data)).read_all()
        if not table.schema.equals(self.schema):
            raise FormatError(self.url, info.path, "its schema differs from the index's")
        return table

    def close(self) -> None:
        """Drop cached batches and memory maps."""
        with self._lock:
            self._batches.clear()
            self._maps.clear()  # a map closes once no batch read from it is referenced

    def _check_row(self, row: int) -> int:
        if not isinstance(row, (int, np.integer)) or isinstance(row, bool):
            raise TypeError(f"a row number must be an int, not {type(row).__name__}")
        n = self._index.rows
        if not -n <= row < n:
            raise IndexError(f"row {row} is out of range for {self.url} with {n} rows")
        return int(row) % n

    def _read_range(self, shard: int, offset: int, length: int) -> pa.Buffer:
        info = self._index.shards[shard]
        if isinstance(self._store, LocalStore):
            mapped = self._map(self._store, shard)
            if mapped.size != info.bytes:
                raise FormatError(self.url, info.path, f"is {mapped.size} bytes, the index says {info.bytes}",
                                  "the shard was truncated or replaced: run trainio verify")
            return mapped.slice(offset, length)
        return pa.py_buffer(self._store.get(info.path, offset, offset + length))

    def _map(self, store: LocalStore, shard: int) -> pa.Buffer:
        with self._lock:
            mapped = self._maps.get(shard)
            if mapped is not None:
                self._maps.move_to_end(shard)
                return mapped
        info = self._index.shards[shard]
        try:
            mapped = map_local(store, info.path)
        except NotFound as exc:
            raise NotFound(self.url, info.path, "the shard file is missing",
                           "the dataset is incomplete: run trainio verify") from exc
        with self._lock:
            self._maps[shard] = mapped
            while len(self._maps) > _OPEN_MAPS:
                self._maps.popitem(last=False)
        return mapped


def map_local(store: LocalStore, key: str) -> pa.Buffer:
    """The whole file of ``key`` in a local store, memory-mapped read-only (no copy).

    Raises:
        NotFound: the file does not exist.
    """
    try:
        return map_file(store.path_of(key))
    except FileNotFoundError as exc:
        raise NotFound(store.url, key, "no such key") from exc


def map_file(path: str | os.PathLike[str]) -> pa.Buffer:
    """A local file, memory-mapped read-only as an Arrow buffer (no copy); FileNotFoundError if absent."""
    with open(path, "rb") as f:
        empty = os.fstat(f.fileno()).st_size == 0
        return pa.py_buffer(b"" if empty else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def _value_at(column: pa.Array, i: int) -> Any:
    """Row ``i`` of ``column`` as the numpy or Python value the class docstring describes."""
    kind = column.type
    if isinstance(kind, pa.FixedShapeTensorType):
        return column.slice(i, 1).to_numpy_ndarray()[0]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return column[i].values.to_numpy(zero_copy_only=False)
    scalar = column[i]
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return np.asarray(scalar.as_py(), dtype=kind.to_pandas_dtype())[()] if scalar.is_valid else None
    return scalar.as_py()


def _column(column: pa.ChunkedArray) -> Any:
    array = column.combine_chunks()
    kind = array.type
    if isinstance(kind, pa.FixedShapeTensorType):
        return array.to_numpy_ndarray()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        values = array.flatten().to_numpy(zero_copy_only=False)
        offsets = array.offsets.to_numpy() - array.offsets[0].as_py()
        return [values[offsets[j]:offsets[j + 1]] for j in range(len(array))]
    if (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)) and not array.null_count:
        return array.to_numpy(zero_copy_only=False)
    return array.to_pylist()
