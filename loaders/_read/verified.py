"""Which shard files have been checked: by this process, or by its parent or siblings since they forked.

A shard whose bytes matched the index once is not hashed again while its
file stays the same (device, inode, size, modification time). The record
lives in memory shared with every process forked from the one that
imported trainio (``Loader(workers=n)`` and ``DataLoader(num_workers=n)``
workers under ``fork``), so a shard the trainer's checker has read ahead and
checked is not hashed again by each worker. A process started by ``spawn``
keeps a record of its own.

The shared record is a fixed table of slots, written without locks: each
entry carries a checksum of itself, so an entry torn by a concurrent write
reads as absent (its shard is hashed again), never as another file's. A
full neighbourhood overwrites an old entry, which costs only a hash. A
second table says which files a process is hashing now (:func:`hashing`),
so that a worker waits for the trainer's result instead of reading and
hashing the same file at the same time.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from collections.abc import Callable

import xxhash

_Identity = tuple[int, int, int, int]

_SLOTS = 1 << 14
_PROBES = 8
_FIELDS = struct.Struct("<4q16s")  # the file's identity and its xxh3-128
_LAST = struct.Struct("<Q")  # then the entry's own checksum (0: empty), or in a claim the hashing process's pid
_ENTRY_BYTES = _FIELDS.size + _LAST.size
_SLOT_BYTES = 64
_POLL_S = 0.001  # how often a file another process is hashing is looked at again


def _shared_table() -> mmap.mmap | bytearray:
    try:
        return mmap.mmap(-1, _SLOTS * _SLOT_BYTES)  # anonymous and MAP_SHARED: forked processes see one table
    except OSError:
        return bytearray(_SLOTS * _SLOT_BYTES)


_table = _shared_table()
_claims = _shared_table()  # the files being hashed now: the same entries, the hashing process's pid for checksum
_local: set[tuple[_Identity, str]] = set()  # what this process found good: no table lookup the next time
_lock = threading.Lock()


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_after_fork)


def _fields(identity: _Identity, xxh3: str) -> bytes:
    return _FIELDS.pack(*identity, bytes.fromhex(xxh3))


def _checksum(fields: bytes) -> int:
    return xxhash.xxh3_64_intdigest(fields) or 1


def _slots(fields: bytes) -> list[int]:
    home = xxhash.xxh3_64_intdigest(fields, seed=1) % _SLOTS
    return [(home + i) % _SLOTS * _SLOT_BYTES for i in range(_PROBES)]


def remember(identity: _Identity, xxh3: str) -> None:
    """Record that the file ``identity`` was hashed whole and matched ``xxh3`` (an xxh3-128, 32 hex digits)."""
    fields = _fields(identity, xxh3)
    entry = fields + _LAST.pack(_checksum(fields))
    with _lock:
        _local.add((identity, xxh3))
        slots = _slots(fields)
        free = None
        for at in slots:
            current = bytes(_table[at:at + _ENTRY_BYTES])
            if current == entry:
                return
            if free is None and not _valid(current):
                free = at  # empty, or torn: free to take
        at = slots[0] if free is None else free
        _table[at:at + _ENTRY_BYTES] = entry


def known(identity: _Identity, xxh3: str) -> bool:
    """Whether a file with this identity was found to match ``xxh3``, here or in a process sharing the record."""
    key = (identity, xxh3)
    if key in _local:
        return True
    fields = _fields(identity, xxh3)
    for at in _slots(fields):
        current = bytes(_table[at:at + _ENTRY_BYTES])
        if current[:_FIELDS.size] == fields and _valid(current):
            _local.add(key)
            return True
    return False


def _valid(entry: bytes) -> bool:
    """Whether a slot's bytes are a whole entry: its fields match its checksum (an empty or torn slot does not)."""
    return bool(_checksum(entry[:_FIELDS.size]) == _LAST.unpack_from(entry, _FIELDS.size)[0])


def claim(identity: _Identity, xxh3: str) -> None:
    """Say that this process is hashing the file ``identity`` now (until :func:`release`)."""
    fields = _fields(identity, xxh3)
    at = _slots(fields)[0]
    _claims[at:at + _ENTRY_BYTES] = fields + _LAST.pack(os.getpid())


def release(identity: _Identity, xxh3: str) -> None:
    """This process has stopped hashing the file ``identity`` (done, failed or paused)."""
    fields = _fields(identity, xxh3)
    at = _slots(fields)[0]
    if bytes(_claims[at:at + _ENTRY_BYTES]) == fields + _LAST.pack(os.getpid()):
        _claims[at:at + _ENTRY_BYTES] = bytes(_ENTRY_BYTES)


def hashing(identity: _Identity, xxh3: str) -> bool:
    """Whether another live process sharing the record is hashing the file ``identity`` now."""
    fields = _fields(identity, xxh3)
    at = _slots(fields)[0]
    current = bytes(_claims[at:at + _ENTRY_BYTES])
    if current[:_FIELDS.size] != fields:
        return False
    pid = _LAST.unpack_from(current, _FIELDS.size)[0]
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False  # it died mid-hash
    except PermissionError:
        pass
    return True


def found_good(identity: _Identity, xxh3: str, stopped: Callable[[], bool]) -> bool:
    """Whether the file ``identity`` was found to match ``xxh3``; if another process is hashing it now, once it is
    done (waited for until ``stopped()`` or long enough to hash it at 50 MB/s), instead of hashing it here too."""
    deadline = time.monotonic() + max(5.0, identity[2] / 50e6)
    while hashing(identity, xxh3) and not stopped() and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    return known(identity, xxh3)


def forget() -> None:
    """Forget every check, in this process and in those sharing the record (benchmarks of a first epoch, tests)."""
    with _lock:
        _local.clear()
        _table[:] = bytes(len(_table))
        _claims[:] = bytes(len(_claims))
