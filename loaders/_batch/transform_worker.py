"""What a transform worker process runs: read its batch's samples, transform each, stack them into a shared slot."""

from __future__ import annotations

import os
import queue
import random
import signal
import sys
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .._format.columns import Columns, sample_of
from .row_hash import RowMismatch, check_rows
from .row_tables import ShardRows
from .shared_slots import SharedSlot, columns_bytes, write_columns

if TYPE_CHECKING:
    from .._streaming import StreamingDataset

Transform = Callable[[dict[str, Any]], dict[str, Any]]

Task = tuple[int, int, str, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...],
             np.ndarray | None, np.ndarray | None]
"""(pass token, batch index, slot name, epoch, positions, shards, record batches, rows within them, the fields
with row digests, and per such field and row whether to check it (None: all) and its digest (None: no row))."""

_KEPT_SAMPLERS = 1024
_PARENT_CHECK_S = 1.0


def seed_all(seed: int, epoch: int, position: int) -> None:
    """Seed Python's, numpy's and (where imported) torch's global generators from (seed, epoch, sample position)."""
    value = hash((seed, epoch, position)) & 0xFFFF_FFFF_FFFF_FFFF
    random.seed(value)
    np.random.seed(value & 0xFFFF_FFFF)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.default_generator.manual_seed(value & 0x7FFF_FFFF_FFFF_FFFF)  # the CPU generator: torch.manual_seed costs 80 us


def fields_of(samples: list[dict[str, Any]]) -> tuple[dict[str, list[np.ndarray] | np.ndarray],
                                                      dict[str, list[Any]]]:
    """The batch's fields: the numeric ones as each sample's array (one shape and dtype per field), byte strings
    packed end to end (a uint8 array, and ``<name>_offsets``: batch + 1 int64, as :class:`Loader` packs binary),
    the others as lists.

    Raises:
        ValueError: a field is an array of different shapes or dtypes in two samples (naming it and both).
    """
    arrays: dict[str, list[np.ndarray] | np.ndarray] = {}
    others: dict[str, list[Any]] = {}
    for name in samples[0]:
        raw = [sample[name] for sample in samples]
        if all(isinstance(v, (bytes, bytearray, memoryview)) for v in raw):
            lengths = np.fromiter((len(v) for v in raw), dtype=np.int64, count=len(raw))
            arrays[name] = np.frombuffer(b"".join(raw), dtype=np.uint8)
            arrays[f"{name}_offsets"] = np.concatenate(([0], np.cumsum(lengths)))
            continue
        values = [_as_array(v) for v in raw]
        first = values[0]
        if first is None or any(v is None for v in values):
            others[name] = [sample[name] for sample in samples]
            continue
        for value in values[1:]:
            assert value is not None
            if value.shape != first.shape or value.dtype != first.dtype:
                raise ValueError(f"field {name!r} is {first.dtype}{list(first.shape)} in one sample and "
                                 f"{value.dtype}{list(value.shape)} in another of the same batch: a transform "
                                 "must return arrays of one shape and dtype per field (crop or pad them)")
        arrays[name] = values  # type: ignore[assignment]
    return arrays, others


def _as_array(value: Any) -> np.ndarray | None:
    """``value`` as a numpy array if it is numbers (an array, a tensor, a scalar), else None."""
    if isinstance(value, np.ndarray):
        return value if value.dtype != object else None
    if hasattr(value, "numpy") and hasattr(value, "detach"):  # a torch tensor
        return np.asarray(value.detach().cpu().numpy())
    if isinstance(value, (bool, int, float, np.generic)):
        return np.asarray(value)
    return None


class _Source:
    """One record batch a worker takes samples from, and, while its shard is not yet known to match the index whole,
    its rows' places: each row a task uses is then checked against its digest before its batch is delivered."""

    __slots__ = ("sample", "first_row", "where", "rows")

    def __init__(self, batch: pa.RecordBatch, rows: ShardRows | None, where: tuple[str, str], first_row: int) -> None:
        self.sample = sample_of(Columns.of(batch, source=where))
        self.where = where  # the dataset's URL and the shard's key
        self.first_row = first_row  # the batch's first row's number in its shard
        self.rows = rows  # its rows to check (every field laid out by rows), or None: it is checked already


Checks = list[tuple[str, np.ndarray, np.ndarray]]
"""What to check of a batch, by field: (the field, the places in the batch of the samples to check, their digests)."""


def _checks(sources: list[_Source], fields: tuple[str, ...], checked: np.ndarray | None,
            expected: np.ndarray | None, *, in_place: bool) -> Checks:
    """What to check of the batch: each field of each sample with a digest in ``expected`` (the trainer's, per
    field of ``fields`` and sample, where ``checked``; None: all of them; ``expected`` None: none). Where the rows
    are checked in their shards (``in_place``), only those of sources not yet known good (``sources[i].rows``).

    Raises:
        RuntimeError: a sample not yet known good has a field without a digest to check it against.
    """
    if checked is None and expected is not None and not in_place:  # every field of every sample: the plain case
        every = np.arange(len(sources))
        return [(name, every, expected[f]) for f, name in enumerate(fields)]
    fresh = [source.rows is not None for source in sources]
    if not any(fresh):
        return []
    checks: Checks = []
    if expected is not None:
        wanted = np.asarray(fresh) if checked is None else checked & np.asarray(fresh)
        checks = [(name, places, expected[f, places]) for f, name in enumerate(fields)
                  if (places := np.flatnonzero(wanted if checked is None else wanted[f])).size]
    if sum(places.size for _, places, _ in checks) != sum(len(s.rows.fields) for s in sources if s.rows is not None):
        url, key = next(s for s, new in zip(sources, fresh) if new).where
        raise RuntimeError(f"{url}: {key}: rows not yet checked came without the digests of all their fields; "
                           "nothing of the batch was delivered")
    return checks


def _check_source_rows(checks: Checks, sources: list[_Source], rows: list[int]) -> None:
    """Check the rows ``checks`` names where they lie in their shards (before a transform sees them).

    Raises:
        IntegrityError: a row does not match its digest (naming its shard, field and row).
    """
    addresses: list[int] = []
    sizes: list[int] = []
    for name, places, _ in checks:
        for i in places.tolist():
            table = sources[i].rows
            assert table is not None  # in place, only samples of sources with rows to check are checked
            field, row = table.fields[name], rows[i]
            addresses.append(int(field.addresses[row]))
            sizes.append(field.row_bytes if field.lengths is None else int(field.lengths[row]) * field.dtype.itemsize)
    _check(checks, sources, rows, np.asarray(addresses, dtype=np.int64), np.asarray(sizes, dtype=np.int64))


def _check_delivered_rows(checks: Checks, sources: list[_Source], rows: list[int], slot: SharedSlot,
                          arrays: dict[str, list[np.ndarray] | np.ndarray],
                          layout: list[tuple[str, str, tuple[int, ...], int]]) -> None:
    """Check the rows ``checks`` names as :func:`write_columns` wrote them, untransformed, to ``slot``: the bytes
    the trainer gets, while they are in this CPU's cache.

    Raises:
        IntegrityError: as :func:`_check_source_rows`.
    """
    base, offsets = slot.array.ctypes.data, {name: offset for name, _, _, offset in layout}
    addresses: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    for name, places, _ in checks:
        column, start, at = arrays[name], base + offsets[name], places
        if isinstance(column, np.ndarray):  # binary, packed end to end with its offsets (fields_of)
            ends = np.asarray(arrays[f"{name}_offsets"], dtype=np.int64)
            addresses.append(start + ends[at])
            sizes.append(ends[at + 1] - ends[at])
        else:
            size = column[0].nbytes
            addresses.append(start + at * size)
            sizes.append(np.full(at.size, size, dtype=np.int64))
    _check(checks, sources, rows, _joined(addresses), _joined(sizes))


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _check(checks: Checks, sources: list[_Source], rows: list[int], addresses: np.ndarray,
           sizes: np.ndarray) -> None:
    """Check the bytes at ``addresses``/``sizes`` against the digests of ``checks``, in their order, in one call
    of the C routine.

    Raises:
        IntegrityError: a row does not match its digest (naming its shard, field and row).
    """
    try:
        check_rows(addresses, sizes, _joined([digests for _, _, digests in checks]))
    except RowMismatch as mismatch:
        index = mismatch.index
        for name, places, _ in checks:
            if index < places.size:
                place = int(places[index])
                raise mismatch.error(*sources[place].where, name, sources[place].first_row + rows[place]) from None
            index -= places.size
        raise


def work(dataset: StreamingDataset, transform: Transform | None, tasks: Any, results: Any, worker: int,
         parent: int) -> None:
    """Serve tasks until told to stop (None) or the parent process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it stops the workers
    reader = dataset._open_reader()
    slots: dict[str, SharedSlot] = {}
    samplers: OrderedDict[tuple[int, int], _Source] = OrderedDict()
    seed = dataset._seed
    try:
        while True:
            try:
                task = tasks.get(timeout=_PARENT_CHECK_S)
            except queue.Empty:
                if os.getppid() != parent:
                    return
                continue
            if task is None:
                return
            token, index, slot_name, epoch, positions, shards, batches, rows, fields, checked, expected = task
            where = ""
            try:
                sources = []
                for shard, batch in zip(shards.tolist(), batches.tolist()):
                    source = samplers.get((shard, batch))
                    if source is None:
                        origin, info = dataset._shards[shard]
                        where = f"{origin.url}: {info.path}, record batch {batch}"
                        source = samplers[(shard, batch)] = _Source(*reader.batch_and_rows(shard, batch),
                                                                    (origin.url, info.path),
                                                                    info.batches[batch].first_row)
                        if len(samplers) > _KEPT_SAMPLERS:
                            samplers.popitem(last=False)
                    sources.append(source)
                where = "checking the batch's rows"
                used = rows.tolist()
                checks = _checks(sources, fields, checked, expected, in_place=transform is not None)
                if checks and transform is not None:
                    _check_source_rows(checks, sources, used)
                samples = []
                for position, source, batch, row in zip(positions.tolist(), sources, batches.tolist(), used):
                    where = f"{source.where[0]}: {source.where[1]}, record batch {batch}, row {row}"
                    sample = source.sample(row)
                    if transform is not None:
                        seed_all(seed, epoch, position)
                        sample = transform(sample)
                    samples.append(sample)
                where = "stacking the batch"
                arrays, others = fields_of(samples)
                slot = slots.get(slot_name) or slots.setdefault(slot_name, SharedSlot(name=slot_name))
                need = columns_bytes(arrays)
                made = None
                if need > slot.nbytes:
                    slot = SharedSlot(need + need // 4)
                    slot.owner = False  # the trainer adopts it and removes it
                    made = slots.setdefault(slot.name, slot).name
                stacked = {} if transform is not None else {
                    name: digests for name, places, digests in checks
                    if places.size == len(samples) and isinstance(arrays.get(name), list)}
                try:
                    layout = write_columns(slot, arrays, stacked)  # checked as they are copied
                except RowMismatch as mismatch:
                    source, row = sources[mismatch.index], used[mismatch.index]
                    raise mismatch.error(*source.where, mismatch.field, source.first_row + row) from None
                rest = [check for check in checks if check[0] not in stacked] if transform is None else []
                if rest:  # binary fields, or rows of shards without digests beside rows to check
                    where = "checking the batch's rows"
                    _check_delivered_rows(rest, sources, used, slot, arrays, layout)
                results.put(("ok", token, index, made, layout, others, len(samples), need))
            except BaseException as exc:  # noqa: BLE001 - reported to the trainer, which raises it
                results.put(("error", token, index, worker, where, f"{type(exc).__name__}: {exc}",
                             traceback.format_exc()))
    finally:
        reader.close()
        for slot in slots.values():
            slot.close()
