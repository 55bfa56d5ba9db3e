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

Task = tuple[int, int, str, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(pass token, batch index, slot name, epoch, positions, shards, record batches, rows within them)."""

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
    its rows' places and digests: each row a task uses is checked before the task uses it."""

    __slots__ = ("sample", "first_row", "where", "names", "checks")

    def __init__(self, batch: pa.RecordBatch, rows: ShardRows | None, where: tuple[str, str], first_row: int) -> None:
        self.sample = sample_of(Columns.of(batch, source=where))
        self.where = where  # the dataset's URL and the shard's key
        self.first_row = first_row  # the batch's first row's number in its shard
        self.names: list[str] = []
        self.checks: list[tuple[int, ...]] | None = None  # per row: (address, size, digest) of each field in turn
        if rows is not None:  # every field has its digests (ShardRows.row_checked)
            checked = [(name, (field.addresses, field.sizes(), field.digests)) for name, field in rows.fields.items()
                       if field.digests is not None]
            self.names = [name for name, _ in checked]
            self.checks = list(zip(*(column.tolist() for _, columns in checked for column in columns)))


def _check_used_rows(sources: list[_Source], rows: list[int]) -> None:
    """Check row ``rows[i]`` of ``sources[i]``, every field of it, for each ``i`` whose source has checks, in one
    call of the C routine (a Python step per row: a task's rows are few, and each may come from another batch).

    Raises:
        IntegrityError: a row does not match its digest (naming its shard, field and row).
    """
    flat: list[int] = []
    for source, row in zip(sources, rows):
        if source.checks is not None:
            flat.extend(source.checks[row])
    if not flat:
        return
    table = np.asarray(flat, dtype=np.uint64).reshape(-1, 3)
    try:
        check_rows(table[:, 0].view(np.int64), table[:, 1].view(np.int64), table[:, 2])
    except RowMismatch as mismatch:
        checked = [(source, name, row) for source, row in zip(sources, rows) if source.checks is not None
                   for name in source.names]
        source, name, row = checked[mismatch.index]
        raise mismatch.error(*source.where, name, source.first_row + row) from None


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
            token, index, slot_name, epoch, positions, shards, batches, rows = task
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
                _check_used_rows(sources, rows.tolist())
                samples = []
                for position, source, batch, row in zip(positions.tolist(), sources, batches.tolist(), rows.tolist()):
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
                layout = write_columns(slot, arrays)
                results.put(("ok", token, index, made, layout, others, len(samples), need))
            except BaseException as exc:  # noqa: BLE001 - reported to the trainer, which raises it
                results.put(("error", token, index, worker, where, f"{type(exc).__name__}: {exc}",
                             traceback.format_exc()))
    finally:
        reader.close()
        for slot in slots.values():
            slot.close()
