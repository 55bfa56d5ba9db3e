"""StoreWriter: a new value of one key written in pieces, hashed on its way, published whole or not at all."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from ._atomic import write_all
from ._hashing import Hasher
from .errors import StoreError

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self


class StoreWriter(io.RawIOBase):
    """A writable file whose bytes become the value of one key only when :meth:`commit` succeeds.

    Every byte is hashed (xxh3-128) as it is written; :meth:`commit` makes the
    value durable and visible under the key in one step and returns its
    digest. Until then readers see the key's old value (or none); after
    :meth:`abort`, an error, or a crash, they still do, and nothing of the
    new value is left under a visible name. As a context manager it commits
    when the block ends normally and aborts when it raises. pyarrow can write
    to it through ``pyarrow.PythonFile(writer, mode="w")``.

    Attributes:
        key: The key being written.
        position: Bytes written so far.
    """

    def __init__(self, key: str, file: BinaryIO, publish: Callable[[str], None],
                 discard: Callable[[], None]) -> None:
        super().__init__()
        self.key = key
        self.position = 0
        self._file = file
        self._hasher = Hasher()
        self._publish = publish
        self._discard = discard
        self._finished = False

    def writable(self) -> bool:
        return True

    def write(self, data: Buffer) -> int:
        """Write all of ``data``; the number of bytes written."""
        if self._finished:
            raise ValueError(f"{self.key!r}: write after commit or abort")
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        write_all(self._file, view)
        self.position += view.nbytes
        return view.nbytes

    def fileno(self) -> int:
        """The descriptor of the file being written (for ``fsync`` or kernel copies)."""
        return self._file.fileno()

    def commit(self) -> str:
        """Publish the value under the key, durably where the store is; its xxh3-128.

        Raises:
            StoreError: it could not be published; the key keeps its old value.
        """
        if self._finished:
            raise ValueError(f"{self.key!r}: already committed or aborted")
        self._finished = True
        digest = self._hasher.hexdigest()
        try:
            self._publish(digest)
        except BaseException:
            self._discard()
            raise
        finally:
            super().close()
        return digest

    def abort(self) -> None:
        """Drop what was written; the key keeps its old value. Safe to call more than once."""
        if not self._finished:
            self._finished = True
            self._discard()
        super().close()

    def close(self) -> None:
        """Abort unless committed: closing is never a way to publish half a value."""
        self.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None and not self._finished:
            self.commit()
        else:
            self.abort()


def spooled_writer(key: str, upload: Callable[[str], str], url: str) -> StoreWriter:
    """A writer for a store that cannot append: bytes go to a local temp file, which ``commit`` hands to
    ``upload`` (it returns the uploaded bytes' xxh3-128) and then removes.

    Raises (from ``commit``):
        StoreError: the uploaded bytes are not the written ones (the spool file changed meanwhile).
    """
    fd, spool = tempfile.mkstemp(prefix="trainio-upload-")
    file = io.FileIO(fd, "wb")

    def publish(digest: str) -> None:
        file.close()
        uploaded = upload(spool)
        if uploaded != digest:
            raise StoreError(url, key, f"uploaded bytes hash to {uploaded}, written ones to {digest}",
                             "the local spool file changed during the upload")
        os.unlink(spool)

    def discard() -> None:
        file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spool)

    return StoreWriter(key, file, publish, discard)
