"""verify_dataset: re-hash and re-decode every shard of a dataset against its index."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.ipc as ipc

from trainio.storage import FormatError, IntegrityError, NotFound, Store, StoreError, digest, open_store

from .._format.index import INDEX_KEY, SHARD_DIR, DatasetIndex, ShardInfo, load_index
from .dataset import map_local
from .row_check import RowDigestTable, check_batch_rows, read_row_digests


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a dataset: which file, and what."""

    path: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    """What :func:`verify_dataset` found. ``ok`` only when there are no problems.

    Attributes:
        orphans: Files under ``shards/`` that the index does not list (left by
            an unfinished write); reported, not counted as problems.
    """

    url: str
    rows: int = 0
    shards: int = 0
    bytes: int = 0
    problems: tuple[Problem, ...] = ()
    orphans: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.problems


def verify_dataset(
    url: str | os.PathLike[str] | Store,
    *,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check a dataset completely: the index, then every shard in parallel.

    Per shard: present, of the recorded size, with the recorded xxh3-128; an
    Arrow IPC file of the index's schema whose footer agrees with the index
    on batches and rows; and every batch byte range the index records
    decodes to the recorded number of rows. Where the shard has row digests:
    their file present, of the size the rows imply, with the recorded
    xxh3-128, and every row of every batch matching its digest.
    ``progress`` is called with the byte count of each shard as it is done.

    Returns:
        A report; it never raises for a problem of the dataset itself.
    """
    store = url if isinstance(url, Store) else open_store(url)
    try:
        index, _ = load_index(store)
    except NotFound as exc:
        leftovers = store.list(SHARD_DIR)
        reason = _absence(store, INDEX_KEY, exc) or "missing: this is not a dataset"
        if leftovers:
            reason += f" ({len(leftovers)} shard files of an unfinished or killed write are here)"
        return VerifyReport(url=store.url, problems=(Problem(INDEX_KEY, reason),), orphans=tuple(leftovers))
    except FormatError as exc:
        return VerifyReport(url=store.url, problems=(Problem(INDEX_KEY, exc.problem),))
    except StoreError as exc:
        return VerifyReport(url=store.url, problems=(Problem(INDEX_KEY, f"unreadable: {exc.problem}"),))
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="trainio-verify") as pool:
        results = list(pool.map(lambda shard: _check_shard(store, index, shard, progress), index.shards))
    listed = {key for s in index.shards for key in s.files}
    return VerifyReport(
        url=store.url, rows=index.rows, shards=len(index.shards), bytes=sum(s.bytes for s in index.shards),
        problems=tuple(p for found in results for p in found),
        orphans=tuple(k for k in store.list(SHARD_DIR) if k not in listed),
    )


def _check_shard(
    store: Store, index: DatasetIndex, shard: ShardInfo, progress: Callable[[int], None] | None
) -> list[Problem]:
    try:
        return _shard_problems(store, index, shard)
    except NotFound as exc:
        return [Problem(shard.path, _absence(store, shard.path, exc) or "missing")]
    except StoreError as exc:
        return [Problem(shard.path, f"unreadable: {exc.problem}")]
    finally:
        if progress is not None:
            progress(shard.bytes)


def _shard_problems(store: Store, index: DatasetIndex, shard: ShardInfo) -> list[Problem]:
    size = store.size(shard.path)
    if size != shard.bytes:
        return [Problem(shard.path, f"is {size} bytes, the index says {shard.bytes} (truncated or replaced)")]
    data = _read_whole(store, shard.path)
    actual = digest(data)
    if actual != shard.xxh3_128:
        return [Problem(shard.path, f"xxh3-128 is {actual}, the index says {shard.xxh3_128} (corrupt)")]
    try:
        reader = ipc.open_file(data)
    except (pa.ArrowException, ValueError, OSError) as exc:
        return [Problem(shard.path, f"is not an Arrow IPC file ({exc})")]
    problems = []
    if not reader.schema.equals(index.schema):
        problems.append(Problem(shard.path, "its schema differs from the index's"))
    footer_rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    if footer_rows != shard.rows:
        problems.append(Problem(shard.path, f"its footer lists {footer_rows} rows, the index says {shard.rows}"))
    if reader.num_record_batches != len(shard.batches):
        problems.append(Problem(shard.path, f"its footer lists {reader.num_record_batches} batches, "
                                            f"the index says {len(shard.batches)}"))
    row_digests, problem = _row_digests(store, shard)
    problems += [problem] if problem is not None else []
    rows_key = shard.row_xxh3.path if shard.row_xxh3 is not None else ""
    for number, batch in enumerate(shard.batches):
        try:
            decoded = ipc.read_record_batch(data.slice(batch.offset, batch.length), index.schema)
        except (pa.ArrowException, ValueError, OSError) as exc:
            problems.append(Problem(shard.path, f"batch {number} at byte {batch.offset} does not decode ({exc})"))
            continue
        if decoded.num_rows != shard.batch_rows(number):
            problems.append(Problem(shard.path, f"batch {number} holds {decoded.num_rows} rows, "
                                                f"the index says {shard.batch_rows(number)}"))
        elif row_digests is not None:
            try:
                if not check_batch_rows((store.url, shard.path), decoded, batch.first_row, row_digests):
                    problems.append(Problem(rows_key, f"batch {number} of {shard.path} has a field that rows "
                                                      "cannot be checked in"))
            except IntegrityError as exc:
                problems.append(Problem(rows_key, f"{exc.what} of {shard.path} is {exc.actual}, its digest "
                                                  f"{exc.expected} (wrong digests)"))
    return problems


def _row_digests(store: Store, shard: ShardInfo) -> tuple[RowDigestTable | None, Problem | None]:
    """The shard's row digests, where it has them, and what is wrong with their file."""
    if shard.row_xxh3 is None:
        return None, None
    try:
        return read_row_digests(store, shard), None
    except NotFound as exc:
        return None, Problem(shard.row_xxh3.path, _absence(store, shard.row_xxh3.path, exc) or "missing")
    except IntegrityError as exc:
        return None, Problem(shard.row_xxh3.path, f"xxh3-128 is {exc.actual}, the index says {exc.expected} "
                                                  "(corrupt)")
    except (FormatError, StoreError) as exc:
        return None, Problem(shard.row_xxh3.path, exc.problem)


def _absence(store: Store, key: str, exc: NotFound) -> str:
    """"" when ``key`` is plainly absent; else why what is there cannot be read (a FIFO in place of a file, say)."""
    local = store.local_path(key)
    if local is not None and os.path.lexists(local):
        return f"unreadable: {exc.problem}"
    return ""


def _read_whole(store: Store, key: str) -> pa.Buffer:
    return map_local(store, key).buffer if store.local_path(key) is not None else pa.py_buffer(store.get(key))
