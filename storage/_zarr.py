"""ZarrStore: zarr v3's Store API on top of any trainio Store."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from functools import partial
from typing import Self, TypeVar

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.abc.store import Store as _ZarrStoreABC
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.config import config as _zarr_config

from ._keys import check_prefix
from ._store import Store
from .errors import AlreadyExists, InvalidKey, NotFound, StoreError

T = TypeVar("T")

_SIZE_FIRST_BYTES = 8 << 20
"""Ranges longer than this are clamped to the object's size before they are read."""


class ZarrStore(_ZarrStoreABC):
    """zarr v3's ``zarr.abc.store.Store`` over a trainio :class:`Store`, under a key prefix.

    The zarr key ``k`` is the trainio key ``<prefix>/k`` (or ``k`` when
    ``prefix`` is ""). The adapter adds no caching or state of its own, so
    it inherits the trainio store's guarantees: every ``set`` is atomic and
    durable, ``set_if_not_exists`` is a create-only put (atomic on every
    backend that refuses a create over an existing key), and methods are
    thread-safe. Async methods await the trainio store's ``_async`` twins,
    which run on its bounded I/O pool, so the event loop never blocks; the
    ``*_sync`` methods (zarr's ``SupportsSyncStore``) call the blocking
    methods directly.

    zarr's conventions, translated from trainio's:

    - A missing key reads as ``None`` (``get``), ``False`` (``exists``) or
      ``FileNotFoundError`` (``getsize``; trainio's ``NotFound`` is one).
      A key trainio cannot hold ("" or one with empty, '.' or '..' parts)
      cannot exist, so it reads as missing and deleting it does nothing;
      writing it raises :class:`~trainio.storage.errors.InvalidKey`.
    - Byte ranges are lenient: a range reaching past the end is cut at the
      end, and one starting past it reads as empty. Only the requested bytes
      are fetched; a suffix request, or a range over 8 MiB, first asks
      for the object's size.
    - ``list_prefix`` matches keys by string prefix (``"fo"`` matches
      ``"foo/x"``); ``list_dir`` and ``delete_dir`` treat the prefix as a
      directory.
    - A read-only store refuses every write with zarr's ``ValueError``.
    - ``clear()`` deletes every key under the prefix: the whole trainio
      store when ``prefix`` is "".

    Other trainio errors (``StoreUnavailable``, ``IntegrityError``, a
    ``StoreError`` for access denied) propagate unchanged. ``close()`` closes
    only this adapter: the trainio store belongs to the caller, who may share
    it. Two ZarrStores are equal when their trainio stores are equal and
    their prefixes and ``read_only`` flags match; they pickle as long as the
    trainio store does.

    Args:
        store: The trainio store holding the bytes.
        prefix: The key prefix the zarr hierarchy lives under ("" for the
            store's root); surrounding '/' are ignored.
        read_only: Refuse writes.

    Raises:
        TypeError: ``store`` is not a trainio Store.
        InvalidKey: ``prefix`` is not a valid key prefix.
    """

    supports_writes: bool = True
    supports_deletes: bool = True
    supports_listing: bool = True

    def __init__(self, store: Store, prefix: str = "", *, read_only: bool = False) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"ZarrStore needs a trainio Store, not {type(store).__name__}")
        super().__init__(read_only=read_only)
        self._store = store
        self._prefix = check_prefix(store.url, prefix.strip("/"))

    @property
    def store(self) -> Store:
        """The trainio store holding the bytes."""
        return self._store

    @property
    def prefix(self) -> str:
        """The key prefix inside the trainio store ("" for its root)."""
        return self._prefix

    def with_read_only(self, read_only: bool = False) -> Self:
        # docstring inherited
        return type(self)(self._store, self._prefix, read_only=read_only)

    def __eq__(self, value: object) -> bool:
        return (
            isinstance(value, ZarrStore)
            and value._store == self._store
            and value._prefix == self._prefix
            and value._read_only == self._read_only
        )

    def __hash__(self) -> int:
        return hash((type(self), self._store, self._prefix, self._read_only))

    def __str__(self) -> str:
        return f"{self._store.url.rstrip('/')}/{self._prefix}" if self._prefix else self._store.url

    def __repr__(self) -> str:
        return f"ZarrStore({self._store!r}, prefix={self._prefix!r}, read_only={self._read_only})"

    def _key(self, key: str) -> str:
        """The trainio key of the zarr key ``key``."""
        return f"{self._prefix}/{key}" if self._prefix else key

    def _dir(self, prefix: str) -> str:
        """The trainio directory prefix of the zarr directory ``prefix`` ("" or "a/b", no trailing '/')."""
        prefix = prefix.strip("/")
        return self._key(prefix) if prefix else self._prefix

    def _relative(self, keys: builtins.list[str]) -> builtins.list[str]:
        """Trainio keys under the prefix, made zarr keys again."""
        if not self._prefix:
            return keys
        cut = len(self._prefix) + 1
        return [key[cut:] for key in keys]

    # -- reads -----------------------------------------------------------------

    async def get(
        self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        # docstring inherited
        _check_request(byte_range)
        data = await self._store._offload(_read_sync, self._store, self._key(key), byte_range)
        return None if data is None else _buffer(data, prototype)

    def get_sync(
        self, key: str, *, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        """Blocking twin of :meth:`get` (zarr's ``SupportsGetSync``)."""
        _check_request(byte_range)
        data = _read_sync(self._store, self._key(key), byte_range)
        return None if data is None else _buffer(data, prototype)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> builtins.list[Buffer | None]:
        # docstring inherited
        return await _gather_bounded([partial(self.get, key, prototype, byte_range) for key, byte_range in key_ranges])

    async def exists(self, key: str) -> bool:
        # docstring inherited
        try:
            return await self._store.exists_async(self._key(key))
        except InvalidKey:
            return False

    async def getsize(self, key: str) -> int:
        # docstring inherited
        try:
            return await self._store.size_async(self._key(key))
        except InvalidKey as exc:
            raise NotFound(exc.url, exc.key, f"no such key ({exc.problem})") from exc

    # -- writes ----------------------------------------------------------------

    async def set(self, key: str, value: Buffer) -> None:
        # docstring inherited
        self._check_writable()
        await self._store.put_async(self._key(key), _bytes_of(value))

    def set_sync(self, key: str, value: Buffer) -> None:
        """Blocking twin of :meth:`set` (zarr's ``SupportsSetSync``)."""
        self._check_writable()
        self._store.put(self._key(key), _bytes_of(value))

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        # docstring inherited
        self._check_writable()
        try:
            await self._store.put_async(self._key(key), _bytes_of(value), overwrite=False)
        except AlreadyExists:
            pass

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        # docstring inherited
        await _gather_bounded([partial(self.set, key, value) for key, value in values])

    async def delete(self, key: str) -> None:
        # docstring inherited
        self._check_writable()
        try:
            await self._store.delete_async(self._key(key))
        except InvalidKey:
            pass  # no such key can exist

    def delete_sync(self, key: str) -> None:
        """Blocking twin of :meth:`delete` (zarr's ``SupportsDeleteSync``)."""
        self._check_writable()
        try:
            self._store.delete(self._key(key))
        except InvalidKey:
            pass  # no such key can exist

    async def delete_dir(self, prefix: str) -> None:
        # docstring inherited
        self._check_writable()
        try:
            await self._store.delete_prefix_async(self._dir(prefix))
        except InvalidKey:
            pass  # no key can live under it

    # -- listing ---------------------------------------------------------------

    async def _list_dir_keys(self, prefix: str) -> builtins.list[str]:
        """Every zarr key under the directory ``prefix``, sorted."""
        try:
            return self._relative(await self._store.list_async(self._dir(prefix)))
        except InvalidKey:
            return []

    async def list(self) -> AsyncIterator[str]:
        # docstring inherited
        for key in await self._list_dir_keys(""):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        for key in await self._list_dir_keys(prefix.rpartition("/")[0]):
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        directory = prefix.strip("/")
        cut = len(directory) + 1 if directory else 0
        seen: set[str] = set()
        for key in await self._list_dir_keys(directory):
            child = key[cut:].partition("/")[0]
            if child not in seen:
                seen.add(child)
                yield child


# -- byte ranges: zarr's lenient requests on trainio's strict [start, end) -------


def _check_request(byte_range: object) -> None:
    """Raise if ``byte_range`` is not a well-formed zarr ByteRequest (or None)."""
    if byte_range is None:
        return
    if isinstance(byte_range, RangeByteRequest):
        if byte_range.start < 0 or byte_range.end < byte_range.start:
            raise ValueError(f"{byte_range}: a range needs 0 <= start <= end")
    elif isinstance(byte_range, OffsetByteRequest):
        if byte_range.offset < 0:
            raise ValueError(f"{byte_range}: the offset must be >= 0")
    elif isinstance(byte_range, SuffixByteRequest):
        if byte_range.suffix < 0:
            raise ValueError(f"{byte_range}: the suffix length must be >= 0")
    else:
        raise TypeError(f"Unexpected byte_range, got {byte_range!r}.")


def _first_try(byte_range: ByteRequest | None) -> tuple[int, int | None] | None:
    """The [start, end) to read while the size is unknown; None when the size is needed first.

    A suffix needs the size. So does a long range: a backend may allocate the
    requested length before it learns the object is shorter, and one small
    size request costs little next to a transfer of that length.
    """
    if byte_range is None:
        return 0, None
    if isinstance(byte_range, RangeByteRequest):
        if byte_range.end - byte_range.start > _SIZE_FIRST_BYTES:
            return None
        return byte_range.start, byte_range.end
    if isinstance(byte_range, OffsetByteRequest):
        return byte_range.offset, None
    return None


def _clamped(byte_range: ByteRequest | None, size: int) -> tuple[int, int]:
    """The [start, end) of ``byte_range`` inside an object of ``size`` bytes."""
    if isinstance(byte_range, RangeByteRequest):
        return min(byte_range.start, size), min(byte_range.end, size)
    if isinstance(byte_range, OffsetByteRequest):
        return min(byte_range.offset, size), size
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, size - byte_range.suffix), size
    return 0, size


def _past_the_end(exc: StoreError) -> bool:
    """Whether a failed ranged read may just have reached past the object's end.

    trainio raises a plain StoreError for that; its subclasses (NotFound,
    StoreUnavailable, IntegrityError, ...) mean something else. Another
    plain StoreError is raised again by the size lookup that follows.
    """
    return type(exc) is StoreError


def _read_sync(store: Store, key: str, byte_range: ByteRequest | None) -> bytes | None:
    """The bytes of ``byte_range`` of ``key``, or None if the key is missing."""
    try:
        first = _first_try(byte_range)
        if first is not None:
            try:
                return store.get(key, *first)
            except StoreError as exc:
                if byte_range is None or not _past_the_end(exc):
                    raise
        return store.get(key, *_clamped(byte_range, store.size(key)))
    except (NotFound, InvalidKey):
        return None


# -- helpers -----------------------------------------------------------------------


def _buffer(data: bytes, prototype: BufferPrototype | None) -> Buffer:
    """``data`` as a Buffer of ``prototype`` (zarr's default when None), without a copy on the CPU."""
    return (default_buffer_prototype() if prototype is None else prototype).buffer.from_bytes(data)


def _bytes_of(value: Buffer) -> memoryview:
    """A host view of a zarr Buffer's bytes (no copy for CPU buffers)."""
    if not isinstance(value, Buffer):
        raise TypeError(f"ZarrStore.set(): value must be a zarr Buffer, not {type(value).__name__}")
    return memoryview(value.as_buffer_like())


async def _gather_bounded(calls: builtins.list[Callable[[], Awaitable[T]]]) -> builtins.list[T]:
    """Run ``calls`` concurrently, at most zarr's ``async.concurrency`` at a time; results in order."""
    limit = asyncio.Semaphore(int(_zarr_config.get("async.concurrency")))

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with limit:
            return await call()

    return builtins.list(await asyncio.gather(*(one(call) for call in calls)))
