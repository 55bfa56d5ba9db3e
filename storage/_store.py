"""The one byte-store abstraction every backend implements."""

from __future__ import annotations

import builtins
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Self, TypeVar

from ._async import ProcessPool, twin
from ._atomic import atomic_file
from ._hashing import check_digest, digest
from ._keys import check_key, check_prefix, check_range
from ._streams import HashingReader, HashingWriter
from ._writer import StoreWriter, spooled_writer
from .errors import NotFound

if TYPE_CHECKING:
    from typing_extensions import Buffer

T = TypeVar("T")

_CONCURRENT_HASH_BYTES = 8 << 20


class Store(ABC):
    """Bytes under relative '/'-separated keys, on one backend.

    Contract, for every backend (checked by ``tests/storage/store_contract.py``):

    - Keys are validated before any I/O: relative, '/'-separated, no empty,
      '.' or '..' parts, no backslash or control character; a bad key raises
      :class:`~trainio.storage.errors.InvalidKey` naming it.
    - ``put`` is atomic: a reader sees the old value or the new one, never a
      torn or partial one, also if the writer is killed midway.
    - A missing key raises :class:`~trainio.storage.errors.NotFound`; reads
      never return ``None``. ``delete`` of a missing key is not an error.
    - Errors are trainio errors carrying the store's ``url`` and the key.
    - Every method is thread-safe. Each has an ``_async`` twin that runs it
      on the store's bounded I/O pool (``io_threads`` threads, re-created after
      ``fork``).
    - Stores pickle (without their pools and connections) and compare equal
      when they address the same place with the same options.
    """

    def __init__(self, *, io_threads: int) -> None:
        self._io = ProcessPool(io_threads, "trainio-io")

    # -- identity -----------------------------------------------------------

    @property
    @abstractmethod
    def url(self) -> str:
        """Where the store's keys live: ``file:///abs/path`` or ``s3://bucket/prefix``."""

    @abstractmethod
    def _identity(self) -> tuple[object, ...]:
        """Everything that makes two stores address the same bytes in the same way."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, Store) and other._identity() == self._identity()

    def __hash__(self) -> int:
        return hash((type(self), self._identity()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in self._transient_attributes():
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_transient()

    def _transient_attributes(self) -> tuple[str, ...]:
        """Attributes that belong to one process (clients, locks) and are not pickled."""
        return ()

    def _reset_transient(self) -> None:  # noqa: B027 - only backends with per-process attributes need it
        """Make the attributes :meth:`_transient_attributes` names anew, after unpickling."""

    # -- the blocking hooks every backend implements (keys already checked) --

    @abstractmethod
    def _get(self, key: str, start: int, end: int | None) -> bytes: ...

    @abstractmethod
    def _get_into(self, key: str, buffer: memoryview, offset: int) -> None: ...

    @abstractmethod
    def _put(self, key: str, data: memoryview, overwrite: bool) -> None: ...

    @abstractmethod
    def _write_stream(self, key: str, source: HashingReader, size: int, overwrite: bool) -> None: ...

    @abstractmethod
    def _read_stream(self, key: str, sink: HashingWriter, size: int | None) -> None: ...

    @abstractmethod
    def _size(self, key: str) -> int: ...

    @abstractmethod
    def _modified(self, key: str) -> float: ...

    @abstractmethod
    def _list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    def _copy(self, src: str, dst: str) -> None:
        self._put(dst, memoryview(self._get(src, 0, None)), True)

    def _delete_prefix(self, prefix: str) -> int:
        keys = self._list(prefix)
        for key in keys:
            self._delete(key)
        return len(keys)

    # -- the public, synchronous surface -------------------------------------

    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Return bytes ``[start, end)`` of ``key`` (the whole object by default).

        Raises:
            NotFound: the key does not exist.
            StoreError: the range reaches past the end of the object.
        """
        key = check_key(self.url, key)
        lo, hi = check_range(self.url, key, start, end)
        return self._get(key, lo, hi)

    def get_into(self, key: str, buffer: Buffer, offset: int = 0) -> int:
        """Fill the writable ``buffer`` with bytes ``[offset, offset + len(buffer))`` of ``key``.

        Returns the number of bytes written, which is always ``len(buffer)``
        in bytes: a short object raises rather than leave the buffer partly stale.

        Raises:
            NotFound: the key does not exist.
            StoreError: the object has fewer than ``offset + len(buffer)`` bytes.
        """
        key = check_key(self.url, key)
        view = memoryview(buffer)
        if view.readonly:
            raise TypeError(f"get_into({key!r}): the buffer is read-only")
        view = view.cast("B") if view.ndim != 1 or view.format != "B" else view
        lo, _ = check_range(self.url, key, offset, None)
        self._get_into(key, view, lo)
        return view.nbytes

    def put(self, key: str, data: Buffer, *, overwrite: bool = True) -> str:
        """Store ``data`` under ``key`` atomically and durably; return its xxh3-128 digest.

        Args:
            key: Where to store it.
            data: Any bytes-like object.
            overwrite: With False, the write is create-only.

        Raises:
            AlreadyExists: ``overwrite`` is False and the key exists.
            StoreError: the write failed; the previous value is intact.
        """
        key = check_key(self.url, key)
        view = memoryview(data)
        view = view.cast("B") if view.ndim != 1 or view.format != "B" else view
        if view.nbytes < _CONCURRENT_HASH_BYTES:
            result = digest(view)
            self._put(key, view, overwrite)
            return result
        # xxh3 releases the GIL: hash on a helper thread while the bytes are written.
        hashed: list[str] = []
        hasher = threading.Thread(target=lambda: hashed.append(digest(view)), name="trainio-hash")
        hasher.start()
        try:
            self._put(key, view, overwrite)
        finally:
            hasher.join()
        return hashed[0]

    def put_file(self, key: str, path: str | os.PathLike[str], *, overwrite: bool = True) -> str:
        """Store the local file ``path`` under ``key``, streamed; return its xxh3-128 digest.

        Memory stays bounded whatever the file's size; the digest is computed
        as the bytes go out. Atomic like :meth:`put`.
        """
        key = check_key(self.url, key)
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            source = HashingReader(f)
            self._write_stream(key, source, size, overwrite)
        return source.hasher.hexdigest()

    def open_writer(self, key: str, *, overwrite: bool = True, sync: bool = True) -> StoreWriter:
        """A :class:`StoreWriter` for a new value of ``key``, written in pieces.

        Its bytes are hashed as they are written and appear under ``key``,
        atomically (and durably, where the store is), only on ``commit()``.
        Memory stays bounded whatever the value's size: a backend that cannot
        append spools it to a local temp file and uploads it on commit.
        With ``overwrite=False`` the commit fails with ``AlreadyExists`` if
        ``key`` exists by then. With ``sync=False`` a store made durable by
        flushing (local files) publishes the value without flushing it, and
        it may not survive a crash until :meth:`sync` names its key; an
        object store's upload is durable either way.
        """
        key = check_key(self.url, key)
        return spooled_writer(key, lambda spool: self.put_file(key, spool, overwrite=overwrite), self.url)

    def local_path(self, key: str) -> Path | None:
        """The local file that holds ``key`` where this store keeps keys as local files, else None.

        A path lets a caller memory-map or hard-link a key; it says nothing of
        whether the key exists. A key is still only ever written through the
        store's own methods.
        """
        check_key(self.url, key)
        return None

    @property
    def durable(self) -> bool:
        """Whether a write is on stable storage once it returns (an object store's acknowledged PUT is)."""
        return True

    def open_local(self, key: str) -> int | None:
        """A descriptor open for reading on the local regular file of ``key``, or None where keys are not local files.

        The caller closes it. Only a regular file inside the store is opened:
        a FIFO, device or directory is refused without blocking, and so is a
        path that a symbolic link leads out of the store.

        Raises:
            NotFound: the store keeps local files, but there is no such key.
            StoreError: a symbolic link leads the key out of the store.
        """
        check_key(self.url, key)
        return None

    def get_file(self, key: str, path: str | os.PathLike[str], *, expected_xxh3: str | None = None) -> str:
        """Download ``key`` into the local file ``path``, streamed; return its xxh3-128 digest.

        ``path`` appears atomically and only once the bytes are complete and,
        when ``expected_xxh3`` is given, verified; otherwise it is untouched.

        Raises:
            NotFound: the key does not exist.
            IntegrityError: the bytes do not match ``expected_xxh3``.
        """
        key = check_key(self.url, key)
        with atomic_file(os.fspath(Path(path).absolute()), durable=True) as f:
            actual = self.read_to(key, f)
            if expected_xxh3 is not None:
                check_digest(self.url, key, expected_xxh3, actual)
        return actual

    def read_to(self, key: str, file: BinaryIO, *, size: int | None = None) -> str:
        """Write the bytes of ``key`` into ``file``, a new empty file; return their xxh3-128 (not fsynced).

        ``size``, where the caller knows it (an index records it), spares a
        request: exactly that many bytes are read, so pass it to check the digest.

        Raises:
            NotFound: the key does not exist.
            StoreError: the key is shorter than ``size``.
        """
        key = check_key(self.url, key)
        sink = HashingWriter(file)
        self._read_stream(key, sink, size)
        return sink.hasher.hexdigest()

    def verify(self, key: str, expected_xxh3: str) -> None:
        """Re-read the whole of ``key`` and check it against ``expected_xxh3``.

        Raises:
            NotFound: the key does not exist.
            IntegrityError: the digest differs.
        """
        with open(os.devnull, "wb", buffering=0) as nowhere:
            check_digest(self.url, key, expected_xxh3, self.read_to(key, nowhere))

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        try:
            self.size(key)
        except NotFound:
            return False
        return True

    def size(self, key: str) -> int:
        """The size of ``key`` in bytes. Raises NotFound if it does not exist."""
        return self._size(check_key(self.url, key))

    def modified(self, key: str) -> float:
        """When ``key`` was last written, in seconds since the epoch, by the store's own clock.

        Two keys' times compare without trusting this machine's clock (an
        object store stamps writes itself). Raises NotFound if it does not exist.
        """
        return self._modified(check_key(self.url, key))

    def list(self, prefix: str = "") -> list[str]:
        """Every key under the directory-like ``prefix`` ("" for all), sorted.

        ``list("a")`` returns ``a/b`` and ``a/c/d`` but neither ``a`` nor ``ab``.
        Temp files of in-flight or crashed writers are never listed.
        """
        return sorted(self._list(check_prefix(self.url, prefix)))

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """The names of the directory-like children of ``prefix`` ("" for the top), sorted.

        ``list_dirs("a")`` returns ``b`` when ``a/b/c`` exists, without listing
        what lies below: one round trip on object stores, however many keys.
        """
        return sorted(self._list_dirs(check_prefix(self.url, prefix)))

    def _list_dirs(self, prefix: str) -> builtins.list[str]:
        cut = len(prefix) + 1 if prefix else 0
        return list({key[cut:].split("/", 1)[0] for key in self._list(prefix) if "/" in key[cut:]})

    def sync(self, keys: Iterable[str]) -> None:
        """Make the values of ``keys``, written with ``open_writer(sync=False)``, as durable as a synced write.

        Where an acknowledged write is durable, there is nothing to do. A local
        store raises ``NotFound`` for a missing key.
        """
        for key in keys:
            check_key(self.url, key)

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""
        self._delete(check_key(self.url, key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under the directory-like ``prefix``; return how many there were."""
        return self._delete_prefix(check_prefix(self.url, prefix))

    def copy(self, src_key: str, dst_key: str) -> None:
        """Make ``dst_key`` hold the bytes of ``src_key``, atomically, without a round trip where the backend can.

        Raises:
            NotFound: ``src_key`` does not exist.
        """
        src = check_key(self.url, src_key)
        dst = check_key(self.url, dst_key)
        if src == dst:
            self.size(src)
            return
        self._copy(src, dst)

    # -- async twins: the same calls, run on the store's bounded I/O pool ------

    async def _offload(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._io.run(fn, *args, **kwargs)

    get_async = twin(get)
    get_into_async = twin(get_into)
    put_async = twin(put)
    put_file_async = twin(put_file)
    get_file_async = twin(get_file)
    verify_async = twin(verify)
    exists_async = twin(exists)
    size_async = twin(size)
    list_async = twin(list)  # noqa: A003 - the method above, not the builtin
    list_dirs_async = twin(list_dirs)
    delete_async = twin(delete)
    delete_prefix_async = twin(delete_prefix)
    copy_async = twin(copy)

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Release the store's threads and connections; it reopens them if used again."""
        self._io.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

