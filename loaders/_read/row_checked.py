"""A shard its readers check row by row: what the shard checker does for it before they come.

Such a shard has row digests, and its readers (a Loader's) check every row
they copy, so it is never hashed whole for them. The checker only reads it
into the page cache ahead of them when it is not there yet. Whether it is
there is a look at the file (an open, two small system calls and a close:
tens of microseconds), cheaper than starting a thread, so the checker looks
at once, in the thread that plans (:func:`look_at`), and starts threads only
for the shards that need reading (:func:`read_for_readers`).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import verified
from .check_steps import LeftToReaders, PartialFetch
from .cold_hash import cached_share, fetch_by_reads, resident_share

if TYPE_CHECKING:
    from .dataset import Dataset

IN_MEMORY = 0.9
"""This share of a file in the page cache is in memory (a kernel reclaiming idle pages keeps a few % out)."""
_FETCH_PIECE = 8 << 20  # read ahead per step: a closed checker or the read-ahead bound stops it between two


class Look(enum.Enum):
    """What a shard its readers check row by row needs before they come."""

    GOOD = "found good whole already (here, or in a process sharing the record): its readers need not check rows"
    LEFT = "nothing: in memory, or not to be read ahead (its readers' page faults bring it in)"
    COLD = "reading into the page cache ahead of its readers"


def look(dataset: Dataset, shard: int, fd: int, identity: tuple[int, int, int, int], *, read_ahead: bool) -> Look:
    """What shard ``shard`` of ``dataset`` (its file open as ``fd``, of ``identity``) needs now; with ``read_ahead``
    False, never :attr:`Look.COLD`. Where the page cache gives no count (before Linux 6.5), the share in memory is
    estimated from the pages of the shard's mapping."""
    if verified.known(identity, dataset.shards[shard].xxh3_128):
        return Look.GOOD
    if not read_ahead:
        return Look.LEFT
    share = cached_share(fd, identity[2], windows=32)
    if share is None:
        share = resident_share(dataset.mapped(shard).buffer, windows=32)
    return Look.LEFT if share >= IN_MEMORY else Look.COLD


def look_at(dataset: Dataset, shard: int, *, read_ahead: bool) -> tuple[Look, tuple[int, int, int, int] | None]:
    """:func:`look` at shard ``shard``'s file as it is now, and its identity; :attr:`Look.COLD` and None where it
    cannot be opened (the checker's thread meets the error again, and hands it to whoever waits)."""
    try:
        fd, identity = dataset.open_shard(shard)
        try:
            return look(dataset, shard, fd, identity, read_ahead=read_ahead), identity
        finally:
            os.close(fd)
    except Exception:  # noqa: BLE001 - see above
        return Look.COLD, None


def read_for_readers(dataset: Dataset, shard: int, partial: PartialFetch | None, *, read_ahead: bool,
                     allowance: Callable[[PartialFetch], int],
                     note: Callable[[int], None]) -> tuple[tuple[int, int, int, int], None]:
    """A checker's thread on shard ``shard`` (``partial``: where it paused, if it did): the file's identity (and no
    error) if it was found good whole already, else :class:`LeftToReaders` once it is read into the page cache
    where it needs it (:func:`look`; not hashed). Read in steps up to ``allowance(partial)``, which stops at the
    read-ahead bound (``Paused``, keeping ``partial``), each step told to ``note``. The file is opened, not mapped:
    a mapping made on the checker's thread slows the readers' page faults on theirs.

    Raises:
        NotFound, StoreError: the file cannot be opened (handed to whoever waits; its readers meet it too).
    """
    if partial is not None:
        fd = dataset.open_same(shard, partial.identity)
        if fd is None:
            raise LeftToReaders  # replaced since: its readers find out
    else:
        fd, identity = dataset.open_shard(shard)
        partial = PartialFetch(identity, 0)
    try:
        found = look(dataset, shard, fd, partial.identity, read_ahead=read_ahead) if partial.done == 0 else Look.COLD
        if found is Look.GOOD:
            return partial.identity, None
        while found is Look.COLD and partial.done < dataset.shards[shard].bytes:
            end = min(allowance(partial), partial.done + _FETCH_PIECE)
            fetch_by_reads(fd, partial.done, end)
            partial.done = end
            note(end)
    finally:
        os.close(fd)
    raise LeftToReaders
