"""A shard's row digests: read and checked against the index, and a record batch's rows checked against them.

A local shard with a row digests file is checked row by row by the readers
that copy rows, instead of whole before its first sample: the Loader checks
each row as it copies it (``_batch/assemble.py``); a record batch taken
whole in the same process has its rows checked (:func:`check_batch_rows`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from trainio.storage import FormatError, Store, check_digest, digest

from .._batch.row_hash import RowMismatch
from .._batch.row_tables import ShardRows
from .._format.index import ShardInfo

RowDigestTable = dict[str, np.ndarray]
"""Field name to the XXH3-64 of each of the shard's rows (uint64)."""


def read_row_digests(store: Store, info: ShardInfo) -> RowDigestTable:
    """The row digests of shard ``info`` of the dataset in ``store`` (it must have them), once their file matches
    the index.

    Raises:
        IntegrityError: the file's xxh3-128 is not the index's.
        FormatError: its size is not the one the index implies.
        NotFound, StoreError: it is missing, not a regular file, or a link out of the dataset.
    """
    rows_file = info.row_xxh3
    assert rows_file is not None
    expected = rows_file.size(info.rows)
    size = store.size(rows_file.path)
    if size != expected:
        raise FormatError(store.url, rows_file.path, f"is {size} bytes; {info.rows} rows of "
                          f"{len(rows_file.fields)} fields need {expected}",
                          "the row digests file was truncated or replaced: run trainio verify")
    data = store.get(rows_file.path, 0, expected)
    check_digest(store.url, rows_file.path, rows_file.xxh3_128, digest(data))
    table = np.frombuffer(data, dtype="<u8").reshape(len(rows_file.fields), info.rows)
    return {name: table[i] for i, name in enumerate(rows_file.fields)}


def check_batch_rows(source: tuple[str, str], batch: pa.RecordBatch, first_row: int,
                     digests: RowDigestTable) -> bool:
    """Check every row of ``batch`` (rows ``first_row`` on of shard ``source``: dataset URL and key) against
    ``digests``.

    Returns False, having checked nothing, when the batch is not laid out
    for row checks (a field read row by row, such as one with nulls): its
    shard must then be checked whole.

    Raises:
        IntegrityError: a row does not match its digest, naming its field and row.
    """
    found = ShardRows([batch], source=source).digests()
    if found is None or list(found) != list(digests):
        return False
    for name, actual in found.items():
        expected = digests[name][first_row:first_row + batch.num_rows]
        wrong = np.flatnonzero(actual != expected)
        if wrong.size:
            i = int(wrong[0])
            raise RowMismatch(i, int(expected[i]), int(actual[i])).error(*source, name, first_row + i)
    return True
