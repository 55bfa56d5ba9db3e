"""LocalStore: keys as files under a directory (local NVMe or a mounted parallel file system)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ._atomic import atomic_file, fsync_dir, make_dirs, open_temp, publish, temp_name, write_all
from ._keys import TEMP_MARKER, check_bounds, check_key
from ._local_io import kernel_copy, opened_path, pread_exact, preadv_exact
from ._store import Store
from ._streams import HashingReader, HashingWriter
from ._writeback import start_writeback
from ._writer import StoreWriter
from .errors import AlreadyExists, InvalidKey, NotFound, StoreError

_NO_LINK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalOptions:
    """How LocalStore writes and reads.

    Attributes:
        durable: fsync every written file and the directories whose entries
            change, so a committed write survives power loss (default True).
        io_threads: Threads of the pool the ``_async`` twins run on (default 8).
        block_bytes: Buffer size for streamed copies (default 8 MiB; memory
            per concurrent ``put_file``/``get_file``).
    """

    durable: bool = True
    io_threads: int = 8
    block_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        if self.io_threads < 1:
            raise ValueError(f"LocalOptions.io_threads={self.io_threads}: must be >= 1")
        if self.block_bytes < 4096:
            raise ValueError(f"LocalOptions.block_bytes={self.block_bytes}: must be >= 4096")


class LocalStore(Store):
    """Keys as files under ``root``; each key's '/'-parts are directories.

    ``root`` is created by the first write, not before: opening a store to
    read never changes the file system.

    Writes go to a temp file in the target directory, are fsync'd, then
    renamed over the key, and the directory is fsync'd. Reads use ``pread``
    and ``preadv`` straight into the caller's buffer.
    """

    def __init__(self, root: str | os.PathLike[str], *, options: LocalOptions = LocalOptions()) -> None:
        super().__init__(io_threads=options.io_threads)
        self._root = os.path.abspath(os.fspath(root))
        self._url, self._real_root = Path(self._root).as_uri(), os.path.realpath(self._root)
        self._options = options
        if os.path.lexists(self._root) and not os.path.isdir(self._root):
            raise StoreError(self.url, "", "the store root exists but is not a directory")

    @property
    def url(self) -> str:
        return self._url

    @property
    def root(self) -> Path:
        """The directory holding the keys."""
        return Path(self._root)

    @property
    def durable(self) -> bool:
        """Whether writes are fsync'd (``LocalOptions.durable``)."""
        return self._options.durable

    @property
    def options(self) -> LocalOptions:
        """The options this store was made with."""
        return self._options

    def _identity(self) -> tuple[object, ...]:
        return (self._root, self._options)

    def path_of(self, key: str) -> Path:
        """The local file that holds ``key`` (which need not exist yet)."""
        return Path(self._path(check_key(self.url, key)))

    def local_path(self, key: str) -> Path:
        """The local file that holds ``key`` (which need not exist yet)."""
        return self.path_of(key)

    def open_writer(self, key: str, *, overwrite: bool = True, sync: bool = True) -> StoreWriter:
        """A :class:`StoreWriter` writing a temp file beside ``key``'s, renamed over it on commit.

        When durable, the temp file is fsync'd before the rename and the directory after it, unless ``sync=False``
        leaves both to :meth:`sync` (and starts the write-back). A crash leaves a temp name that listings skip.
        """
        check_key(self.url, key)
        with self._errors(key, "write"):
            path = self._writable_path(key)
            tmp, file = open_temp(os.path.dirname(path), durable=self._options.durable)
        flush = self._options.durable and sync

        def publish_file(_: str) -> None:
            with self._errors(key, "write"):
                try:
                    if flush:
                        os.fsync(file.fileno())
                    elif self._options.durable:
                        start_writeback(file.fileno())
                finally:
                    file.close()
                publish(tmp, path, overwrite=overwrite, durable=flush)

        def discard() -> None:
            file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

        return StoreWriter(key, file, publish_file, discard)

    def sync(self, keys: Iterable[str]) -> None:
        """fsync each key's file, then each directory holding one (nothing when the store is not durable)."""
        directories = set()
        for key in keys:
            check_key(self.url, key)
            if self._options.durable:
                with self._errors(key, "sync"):
                    fd = self._open_regular(key)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                directories.add(os.path.dirname(self._path(key)))
        for directory in sorted(directories):
            fsync_dir(directory)

    def open_local(self, key: str) -> int:
        """A file descriptor open for reading on the regular file ``key``; the caller closes it.

        Only a regular file inside the root is opened: a FIFO, device or
        directory is refused without blocking, and so is a path that a
        symbolic link leads out of the root.

        Raises:
            NotFound: there is no such key (or it is not a regular file).
            StoreError: a symbolic link leads the key out of the root.
        """
        check_key(self.url, key)
        with self._errors(key, "read"):
            return self._open_regular(key)

    def _path(self, key: str) -> str:
        return os.path.join(self._root, key)

    @contextmanager
    def _errors(self, key: str, action: str) -> Iterator[None]:
        """Translate OS errors of one operation into trainio errors naming the key."""
        try:
            yield
        except StoreError:
            raise
        except FileExistsError as exc:
            raise AlreadyExists(self.url, key, f"cannot {action}: the key already exists") from exc
        except FileNotFoundError as exc:
            raise NotFound(self.url, key, f"cannot {action}: no such key") from exc
        except IsADirectoryError as exc:
            raise InvalidKey(self.url, key, f"cannot {action}: the key is a directory of other keys") from exc
        except NotADirectoryError as exc:
            if action not in ("write", "copy to"):
                raise NotFound(self.url, key, f"cannot {action}: no such key (a parent of it is a key)") from exc
            raise InvalidKey(
                self.url, key, f"cannot {action}: a parent of this key is itself a key (a file)"
            ) from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StoreError(
                    self.url, key, f"cannot {action}: {exc.strerror or 'no space left'}",
                    "free space on the device; the previous value is intact",
                ) from exc
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise StoreError(
                    self.url, key, f"cannot {action}: {exc.strerror}", "check the directory's permissions"
                ) from exc
            raise StoreError(self.url, key, f"cannot {action}: {exc.strerror or exc}") from exc

    def _open_regular(self, key: str) -> int:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(self._path(key), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._check_inside(key, opened_path(fd) or os.path.realpath(self._path(key)))
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                what = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
                raise NotFound(self.url, key, f"no such key (the path is {what})")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _inside(self, key: str, path: str) -> str:
        """``path`` with every symbolic link resolved, refused if that leaves the root."""
        real = os.path.realpath(path)
        self._check_inside(key, real)
        return real

    def _check_inside(self, key: str, real: str) -> None:
        if not self._is_under_root(real, self._real_root):
            self._real_root = os.path.realpath(self._root)  # the root itself may have been replaced by a link
            if not self._is_under_root(real, self._real_root):
                raise StoreError(self.url, key, f"a symbolic link leads it out of the store's root, to {real}",
                                 "trainio never reads or writes outside a store's root; replace the link by the "
                                 "files")

    @staticmethod
    def _is_under_root(real: str, root: str) -> bool:
        return real == root or real.startswith(root.rstrip(os.sep) + os.sep)

    # -- hooks ----------------------------------------------------------------

    def _get(self, key: str, start: int, end: int | None) -> bytes:
        with self._errors(key, "read"):
            fd = self._open_regular(key)
            try:
                stop = check_bounds(self.url, key, start, end, os.fstat(fd).st_size)
                return pread_exact(fd, start, stop - start, self.url, key)
            finally:
                os.close(fd)

    def _get_into(self, key: str, buffer: memoryview, offset: int) -> None:
        with self._errors(key, "read"):
            fd = self._open_regular(key)
            try:
                check_bounds(self.url, key, offset, offset + buffer.nbytes, os.fstat(fd).st_size)
                preadv_exact(fd, buffer, offset, self.url, key)
            finally:
                os.close(fd)

    def _writable_path(self, key: str) -> str:
        """Where ``key`` is written: its parent directory resolved, refused if a link leads it out of the root."""
        path = self._path(key)
        parent = os.path.dirname(path)
        while not os.path.lexists(parent) and parent.startswith(self._root.rstrip(os.sep) + os.sep):
            parent = os.path.dirname(parent)
        self._inside(key, parent)
        if os.path.islink(path):
            raise StoreError(self.url, key, "is a symbolic link; trainio does not write through links",
                             "remove the link")
        return path

    def _put(self, key: str, data: memoryview, overwrite: bool) -> None:
        with self._errors(key, "write"):
            with atomic_file(self._writable_path(key), durable=self._options.durable, overwrite=overwrite) as f:
                write_all(f, data)

    def _write_stream(self, key: str, source: HashingReader, size: int, overwrite: bool) -> None:
        block = memoryview(bytearray(min(max(size, 1), self._options.block_bytes)))
        with self._errors(key, "write"):
            with atomic_file(self._writable_path(key), durable=self._options.durable, overwrite=overwrite) as f:
                if kernel_copy(source.fileno(), f.fileno(), size, source.hasher, block):
                    return
                while n := source.readinto(block):
                    write_all(f, block[:n])

    def _read_stream(self, key: str, sink: HashingWriter, size: int | None) -> None:
        with self._errors(key, "read"):
            fd = self._open_regular(key)
            try:
                if size is None:
                    size = os.fstat(fd).st_size
                block = memoryview(bytearray(min(max(size, 1), self._options.block_bytes)))
                if kernel_copy(fd, sink.fileno(), size, sink.hasher, block):
                    return
                offset = 0
                while offset < size:
                    n = min(block.nbytes, size - offset)
                    preadv_exact(fd, block[:n], offset, self.url, key)
                    sink.write(block[:n])
                    offset += n
            finally:
                os.close(fd)

    def _stat_regular(self, key: str) -> os.stat_result:
        with self._errors(key, "stat"):
            st = os.stat(self._inside(key, self._path(key)))
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(self.url, key, "no such key (the path is not a regular file)")
        return st

    def _size(self, key: str) -> int:
        return self._stat_regular(key).st_size

    def _modified(self, key: str) -> float:
        return self._stat_regular(key).st_mtime

    def _list(self, prefix: str) -> list[str]:
        top = self._path(prefix) if prefix else self._root
        keys: list[str] = []
        stack = [(top, prefix)]
        while stack:
            directory, rel = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise StoreError(self.url, rel, f"cannot list: {exc.strerror}") from exc
            for entry in entries:
                if entry.name.startswith(TEMP_MARKER):
                    continue
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, name))
                elif entry.is_file(follow_symlinks=False):
                    keys.append(name)
        return keys

    def _list_dirs(self, prefix: str) -> list[str]:
        top = self._path(prefix) if prefix else self._root
        try:
            with os.scandir(top) as entries:
                return [e.name for e in entries
                        if not e.name.startswith(TEMP_MARKER) and e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors(key, "delete"):
            try:
                os.unlink(path)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return
            except PermissionError:
                if os.path.isdir(path):
                    return
                raise
            parent = os.path.dirname(path)
            if self._options.durable:
                fsync_dir(parent)
        self._prune_empty_dirs(parent)

    def _prune_empty_dirs(self, directory: str) -> None:
        while directory != self._root and directory.startswith(self._root + os.sep):
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = os.path.dirname(directory)

    def _delete_prefix(self, prefix: str) -> int:
        keys = self._list(prefix)
        targets = [self._path(prefix)] if prefix else [
            os.path.join(self._root, name) for name in (os.listdir(self._root) if os.path.isdir(self._root) else ())
        ]
        removed = False
        with self._errors(prefix, "delete"):
            for target in targets:
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                    removed = True
                elif os.path.lexists(target) and not prefix:
                    os.unlink(target)
                    removed = True
            if removed and self._options.durable:
                fsync_dir(os.path.dirname(targets[0]))
        if prefix:
            self._prune_empty_dirs(os.path.dirname(self._path(prefix)))
        return len(keys)

    def _copy(self, src: str, dst: str) -> None:
        with self._errors(src, "copy from"):
            src_path = self._inside(src, self._path(src))
            if not stat.S_ISREG(os.stat(src_path).st_mode):
                raise NotFound(self.url, src, "cannot copy from: no such key")
        with self._errors(dst, "copy to"):
            dst_path = self._writable_path(dst)
            directory = os.path.dirname(dst_path)
            make_dirs(directory, durable=self._options.durable)
            tmp = os.path.join(directory, temp_name())
            try:
                os.link(src_path, tmp)
            except OSError as exc:
                if exc.errno not in _NO_LINK_ERRNOS:
                    raise
                with atomic_file(dst_path, durable=self._options.durable) as f, open(src_path, "rb") as s:
                    shutil.copyfileobj(s, f, self._options.block_bytes)
                return
            try:
                publish(tmp, dst_path, overwrite=True, durable=self._options.durable)
            except BaseException:
                os.unlink(tmp)
                raise
