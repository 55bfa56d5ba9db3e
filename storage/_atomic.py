"""Atomic, durable publication of local files: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import errno
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from ._keys import TEMP_MARKER

_MAKEDIRS_RETRIES = 5


def temp_name(kind: str = "w") -> str:
    """A fresh temp name owned by this process: ``<marker><kind>-<host>-<pid>-<random>``.

    Listings never show names of this form, and :func:`temp_owner_is_dead`
    tells from the name alone whether its maker is gone, so leftovers of a
    crash can be told from a live writer's files. ``kind`` holds no ``-``.
    """
    if "-" in kind or "/" in kind:
        raise ValueError(f"a temp name's kind holds no '-' or '/': {kind!r}")
    return f"{TEMP_MARKER}{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def temp_owner_is_dead(name: str) -> bool:
    """Whether the temp name ``name`` (from :func:`temp_name`) was made by a process of this host that has ended.

    False whenever that is not certain: another host's name, a name of
    another form, a process that still runs or that we may not signal.
    """
    if not name.startswith(TEMP_MARKER):
        return False
    parts = name[len(TEMP_MARKER):].split("-")
    if len(parts) < 4 or not parts[-2].isdigit() or "-".join(parts[1:-2]) != socket.gethostname():
        return False
    try:
        os.kill(int(parts[-2]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def fsync_dir(directory: str) -> None:
    """Make the entries of ``directory`` (creations, renames, unlinks) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: str, *, durable: bool) -> None:
    """Create ``directory`` and its missing parents; with ``durable``, fsync each new entry's parent."""
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(directory)
    if parent and parent != directory:
        make_dirs(parent, durable=durable)
    try:
        os.mkdir(directory)
    except FileExistsError:
        if not os.path.isdir(directory):
            raise NotADirectoryError(errno.ENOTDIR, "a file is in the way of a directory", directory) from None
        return
    if durable:
        fsync_dir(parent or ".")


def publish(tmp: str, path: str, *, overwrite: bool, durable: bool) -> None:
    """Move the finished file ``tmp`` to ``path`` in one step.

    With ``overwrite=False`` the move fails with ``FileExistsError`` if
    ``path`` exists (a hard link is create-only), and ``tmp`` is left for the
    caller to remove.
    """
    if overwrite:
        os.replace(tmp, path)
    else:
        os.link(tmp, path)
        os.unlink(tmp)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


def open_temp(directory: str, *, durable: bool) -> tuple[str, BinaryIO]:
    """A new temp file in ``directory`` (made if missing), open for unbuffered writing, and its path."""
    # A concurrent delete may prune a directory we just created; recreate it and retry.
    for attempt in range(_MAKEDIRS_RETRIES):
        make_dirs(directory, durable=durable)
        tmp = os.path.join(directory, temp_name())
        try:
            return tmp, open(tmp, "xb", buffering=0)
        except FileNotFoundError:
            if attempt == _MAKEDIRS_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


@contextmanager
def atomic_file(path: str, *, durable: bool, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Yield an unbuffered new file whose bytes appear at ``path`` when the block ends without error.

    Readers of ``path`` see the old contents or the new, never a mix or a
    prefix. If the block raises (or the process dies), ``path`` is untouched
    and the temp file is removed (or, after a crash, left under a
    temp name that listings skip).
    """
    tmp, f = open_temp(os.path.dirname(path) or ".", durable=durable)
    try:
        with f:
            yield f
            if durable:
                os.fsync(f.fileno())
        publish(tmp, path, overwrite=overwrite, durable=durable)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_all(f: BinaryIO, data: memoryview) -> None:
    """Write every byte of ``data`` to the unbuffered file ``f``, however the OS splits it."""
    written = 0
    total = data.nbytes
    while written < total:
        n = f.write(data[written:])
        if not n:
            raise OSError(errno.EIO, "write returned 0 bytes")
        written += n
