"""Dataset: an opened, validated trainio dataset with random access to its rows."""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from trainio.storage import FormatError, NotFound, Store, check_digest, digest, open_store

from .._format.index import INDEX_KEY, DatasetIndex, ShardInfo, load_index

if TYPE_CHECKING:
    from .shard_check import ShardChecker

_CACHED_BATCHES = 16
_OPEN_MAPS = 64


class Dataset:
    """A trainio dataset, opened read-only: its index, schema and rows.

    Opening reads and validates ``index.json`` (its seal, format, version,
    every shard path inside the dataset, counts that add up). Random access
    reads only the record batches it needs, by the byte ranges the index
    records: memory-mapped for local datasets, ranged GETs for remote ones;
    those reads are not hash-verified (a :class:`StreamingDataset` verifies
    every shard before it yields a sample of it). A whole-shard read
    (:meth:`read_shard`) verifies the shard's xxh3-128. Only regular files
    inside a local dataset's directory are read: a FIFO or a symbolic link
    leading out of it is an error naming the file. Thread-safe.

    Values come back as numpy where numpy has a type for them: numbers and
    bools as numpy scalars (``take``: 1-D arrays), variable-length lists as
    1-D arrays, fixed-shape tensors as arrays of their shape; strings as
    ``str`` and binary as ``bytes``.

    Raises:
        NotFound: there is no ``index.json`` at ``url`` (no dataset, or an
            unfinished write).
        FormatError: the index is damaged or malformed, naming the field.
        StoreError: the index is not a regular file inside the dataset.
    """

    def __init__(self, url: str | os.PathLike[str] | Store) -> None:
        self._store = url if isinstance(url, Store) else open_store(url)
        self._index, raw = load_index(self._store)
        self._index_xxh3 = digest(raw)
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._local = self._store.local_path(INDEX_KEY) is not None
        self._checker: tuple[int, ShardChecker] | None = None  # (the process it belongs to, the checker)
        self._lock = threading.Lock()
        _open_datasets.add(self)
        self._batches: OrderedDict[tuple[int, int], pa.RecordBatch] = OrderedDict()
        self._maps: OrderedDict[int, MappedFile] = OrderedDict()

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
    def is_local(self) -> bool:
        """Whether its files are local files, memory-mapped where they are (else read through a cache)."""
        return self._local

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
        where = self._index.shards[shard].batches[number]
        batch = self.decode_batch(shard, number, self._read_range(shard, where.offset, where.length))
        with self._lock:
            self._batches[(shard, number)] = batch
            while len(self._batches) > _CACHED_BATCHES:
                self._batches.popitem(last=False)
        return batch

    def decode_batch(self, shard: int, number: int, data: pa.Buffer) -> pa.RecordBatch:
        """Record batch ``number`` of shard ``shard`` decoded from ``data``, the bytes of its IPC message.

        The batch's buffers are checked to hold what its metadata says (not
        the values: offsets and bytes are checked where they are read).

        Raises:
            FormatError: the bytes do not decode, or hold another number of rows than the index says.
        """
        info = self._index.shards[shard]
        where = info.batches[number]
        try:
            batch = ipc.read_record_batch(data, self.schema)
            batch.validate()
        except (pa.ArrowException, ValueError, OSError) as exc:
            raise FormatError(self.url, info.path, f"record batch {number} at bytes [{where.offset}, "
                              f"{where.offset + where.length}) does not decode ({exc})",
                              "the shard is corrupt or does not match the index: run trainio verify") from exc
        if batch.num_rows != info.batch_rows(number):
            raise FormatError(self.url, info.path, f"record batch {number} has {batch.num_rows} rows, "
                              f"the index says {info.batch_rows(number)}", "run trainio verify")
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

    def checker(self) -> ShardChecker:
        """This process's checker of the dataset's local shards (see :class:`ShardChecker`), made on first use."""
        with self._lock:
            if self._checker is None or self._checker[0] != os.getpid():  # a forked child gets its own
                from .shard_check import ShardChecker

                # It refers to this dataset weakly: no cycle keeps the two (and every shard's map) alive once the
                # dataset is dropped, and its threads stop then.
                checker = ShardChecker(weakref.proxy(self))
                weakref.finalize(self, _close_checker, os.getpid(), checker)
                self._checker = (os.getpid(), checker)
            return self._checker[1]

    def close(self) -> None:
        """Drop cached batches and memory maps, and stop checking shards."""
        with self._lock:
            checker, self._checker = self._checker, None
        if checker is not None and checker[0] == os.getpid():
            checker[1].close()
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
        if self.is_local:
            return self.mapped(shard).buffer.slice(offset, length)
        return pa.py_buffer(self._store.get(info.path, offset, offset + length))

    def mapped(self, shard: int, *, fresh: bool = False) -> MappedFile:
        """The whole file of shard ``shard`` of a local dataset, memory-mapped (kept for the next call), unverified.

        With ``fresh``, a mapping kept from an earlier call is used only if
        the file is still the one it mapped (device, inode, size and
        modification time); otherwise the file is mapped again.

        Raises:
            NotFound: the shard file is missing, or is not a regular file.
            StoreError: a symbolic link leads it out of the dataset's directory.
            FormatError: its size is not the one the index records.
        """
        if not self.is_local:
            raise TypeError(f"{self.url}: only a local dataset's shards are memory-mapped in place")
        info = self._index.shards[shard]
        with self._lock:
            mapped = self._maps.get(shard)
            if mapped is not None:
                self._maps.move_to_end(shard)
        if mapped is not None and not fresh:
            return mapped
        fd, identity = self.open_shard(shard)
        try:
            if mapped is not None and identity == mapped.identity:
                return mapped
            mapped = _map_open(fd, identity)
        finally:
            os.close(fd)
        if mapped.buffer.size != info.bytes:
            raise FormatError(self.url, info.path, f"is {mapped.buffer.size} bytes, the index says {info.bytes}",
                              "the shard was truncated or replaced: run trainio verify")
        with self._lock:
            self._maps[shard] = mapped
            while len(self._maps) > _OPEN_MAPS:
                self._maps.popitem(last=False)
        return mapped

    def open_shard(self, shard: int) -> tuple[int, tuple[int, int, int, int]]:
        """Shard ``shard``'s local file opened for reading (to be closed) and its identity; errors as :meth:`mapped`'s."""
        info = self._index.shards[shard]
        try:
            fd = _open_local(self._store, info.path)
        except NotFound as exc:
            raise NotFound(self.url, info.path, f"the shard file is missing ({exc.problem})",
                           "the dataset is incomplete: run trainio verify") from exc
        try:
            return fd, identity_of(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise

    def open_same(self, shard: int, identity: tuple[int, int, int, int]) -> int | None:
        """Shard ``shard``'s file of a local dataset opened for reading, if it is still the file of ``identity`` (a
        :attr:`MappedFile.identity`); None if it was replaced or removed since (close the descriptor when done)."""
        try:
            fd, now = self.open_shard(shard)
        except NotFound:
            return None
        if now == identity:
            return fd
        os.close(fd)
        return None


_open_datasets: weakref.WeakSet[Dataset] = weakref.WeakSet()


def _close_checker(pid: int, checker: ShardChecker) -> None:
    """Stop a dropped dataset's checker, in the process that made it (a forked child's copy has no threads, and
    its lock may have been held at the fork)."""
    if os.getpid() == pid:
        checker.close()


def _after_fork() -> None:
    """In a forked child (a DataLoader worker), fresh locks: a checking thread of the parent may have held one."""
    for dataset in list(_open_datasets):
        dataset._lock = threading.Lock()
        dataset._checker = None


os.register_at_fork(after_in_child=_after_fork)


@dataclass(frozen=True, slots=True)
class MappedFile:
    """A file memory-mapped read-only, and which file it was when mapped.

    Attributes:
        buffer: The file's bytes (no copy).
        identity: ``(st_dev, st_ino, st_size, st_mtime_ns)`` of the open file:
            a file replaced or rewritten since has another.
    """

    buffer: pa.Buffer
    identity: tuple[int, int, int, int]


def _open_local(store: Store, key: str) -> int:
    fd = store.open_local(key)
    if fd is None:
        raise TypeError(f"{store.url}: its keys are not local files")
    return fd


def identity_of(st: os.stat_result) -> tuple[int, int, int, int]:
    """``(st_dev, st_ino, st_size, st_mtime_ns)``: which file it is, and whether it was rewritten since."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def map_local(store: Store, key: str) -> MappedFile:
    """The whole file of ``key`` in a store of local files, memory-mapped read-only (no copy).

    Opened through :meth:`Store.open_local`: only a regular file inside
    the store's root, never a FIFO (which would block) or a link leading out.

    Raises:
        NotFound: the file does not exist or is not a regular file.
        StoreError: a symbolic link leads it out of the store's root.
    """
    fd = _open_local(store, key)
    try:
        return _map_open(fd, identity_of(os.fstat(fd)))
    finally:
        os.close(fd)


def _map_open(fd: int, identity: tuple[int, int, int, int]) -> MappedFile:
    """The open file ``fd`` of this identity, memory-mapped read-only whole."""
    return MappedFile(pa.py_buffer(mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if identity[2] else b""), identity)


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
