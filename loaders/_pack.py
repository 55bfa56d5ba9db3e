"""PackedLoader: a rank's documents concatenated into fixed-length token sequences, resumable mid-document."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ._format.columns import Columns
from ._order.resume_state import ResumeMismatch

if TYPE_CHECKING:
    from ._streaming import StreamingDataset

PACK_FORMAT = "trainio.packed"
PACK_VERSION = 1


@dataclass(frozen=True)
class PackTokens:
    """How documents become sequences: the list field ``field`` cut into rows of ``seq_len`` tokens.

    ``eos``, when given, is appended to every document. ``pad`` fills the
    last sequences of an epoch (marked False in ``mask``).
    """

    field: str
    seq_len: int
    eos: int | None = None
    pad: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"PackTokens(seq_len={self.seq_len!r}): must be an integer >= 1")


Packed = tuple[dict[str, np.ndarray | int], int, int]
"""A batch, then the documents finished since the stream began and the tokens of the next one already packed."""


def pack_documents(documents: Iterable[np.ndarray], pack: PackTokens, batch_size: int, offset: int = 0
                   ) -> Iterator[Packed]:
    """Batches of ``batch_size`` sequences of ``pack.seq_len`` tokens, the documents end to end (``eos`` after each).

    The first document is taken from its token ``offset`` on. A document
    that does not fit the rest of a sequence goes on in the next one. Each
    batch holds ``tokens`` and ``position_ids`` (the token's place in its
    document), ``mask`` (False on padding), ``cu_seqlens`` (where each
    segment, one document's part within one sequence or padding, begins in
    the flattened batch, and the total last: what flash-attention's varlen
    kernels take) and ``max_seqlen``. After the last document the batch is
    padded; no batch is yielded empty.

    Raises:
        ValueError: ``offset`` is not inside the first document.
    """
    length, capacity = pack.seq_len, batch_size * pack.seq_len
    tokens = positions = mask = np.empty(0)
    bounds: list[int] = [0]
    fill = finished = 0
    first = True

    def fresh() -> None:
        nonlocal tokens, positions, mask, bounds, fill
        tokens, positions = np.full(capacity, pack.pad, dtype=np.int64), np.zeros(capacity, dtype=np.int64)
        mask, bounds, fill = np.zeros(capacity, dtype=bool), [0], 0

    def batch() -> dict[str, np.ndarray | int]:
        cuts = bounds + [b for b in range(length, capacity + 1, length) if b > fill]  # padding: one per sequence
        cu = np.asarray(cuts, dtype=np.int32)
        return {"tokens": tokens.reshape(batch_size, length), "position_ids": positions.reshape(batch_size, length),
                "mask": mask.reshape(batch_size, length), "cu_seqlens": cu, "max_seqlen": int(np.diff(cu).max())}

    fresh()
    for document in documents:
        if pack.eos is not None:
            document = np.append(document, pack.eos)
        size = len(document)
        if first and not 0 <= offset < max(size, 1):
            raise ValueError(f"a resumed offset of {offset} tokens is not inside its document of {size} tokens")
        first = False
        while offset < size:
            take = min(length - fill % length, size - offset)
            tokens[fill:fill + take] = document[offset:offset + take]
            positions[fill:fill + take] = np.arange(offset, offset + take)
            mask[fill:fill + take] = True
            fill += take
            offset += take
            bounds.append(fill)
            if offset == size:
                finished, offset = finished + 1, 0
                if fill == capacity:
                    yield batch(), finished, offset
                    fresh()
                break
            if fill == capacity:
                yield batch(), finished, offset
                fresh()
        else:
            finished, offset = finished + 1, 0  # an empty document
    if fill:
        yield batch(), finished, offset


class PackedLoader:
    """This rank's documents of a :class:`StreamingDataset`, packed into batches of fixed-length token sequences.

    Each rank packs its own stream: the documents the epoch's order deals
    to it (after partitioning, where the dataset is partitioned), in order,
    so the result is the same on every run with the same seed and layout.
    Every token of the rank's documents is delivered once per epoch (see
    :func:`pack_documents` for what a batch holds). :meth:`state_dict`
    records the epoch, the documents this rank finished and the tokens of
    the next one already delivered; :meth:`load_state_dict` resumes exactly
    there, on the same ranks, without reading the documents before it. A
    pass read to its end advances the dataset's epoch.
    """

    def __init__(self, dataset: StreamingDataset, batch_size: int, pack: PackTokens) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        schema = dataset.dataset.schema
        kind = schema.field(pack.field).type if pack.field in schema.names else None
        if kind is None or not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) \
                or not pa.types.is_integer(kind.value_type):
            raise ValueError(f"{dataset.dataset.url}: PackTokens(field={pack.field!r}) must name a list field of "
                             f"token ids; the schema has {dataset.dataset.schema.names}")
        self._dataset, self._batch, self._pack = dataset, batch_size, pack
        self._state: tuple[int, int, int, int, int, int] | None = None  # _describe's arguments after the last batch
        self._offset = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = self._dataset
        dataset._begin_pass()
        plan = dataset.plan()
        position = plan.position
        start, skipped = position.start, position.skip
        epoch = position.epoch
        layout = plan.layout
        reader = plan.open_reader()
        resumed_at, self._offset = self._offset, 0
        try:
            for batch, finished, into in pack_documents(self._documents(plan, reader), self._pack, self._batch,
                                                        resumed_at):
                self._state = (epoch, start, skipped + finished, into, layout.rank, layout.ranks)  # described on demand
                position.advance(0)
                yield _tensors(batch)
        finally:
            reader.close()
        self._state = None
        dataset._end_pass()

    def _documents(self, plan: Any, reader: Any) -> Iterator[np.ndarray]:
        lists: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for shards, batches, rows in plan.located(reader):
            for shard, number, row in zip(shards.tolist(), batches.tolist(), rows.tolist()):
                found = lists.get((shard, number))
                if found is None:
                    if len(lists) > 4096:
                        lists.clear()
                    columns = Columns.of(reader.batch(shard, number), source=plan.source(shard))
                    found = lists[(shard, number)] = columns.lists[self._pack.field]
                values, offsets = found
                yield values[offsets[row]:offsets[row + 1]]

    def _describe(self, epoch: int, start: int, documents: int, offset: int, rank: int, ranks: int
                  ) -> dict[str, Any]:
        dataset_state = self._dataset.state_dict(consumed=start)
        if dataset_state["epoch"] != epoch:
            raise RuntimeError(f"the dataset is in epoch {dataset_state['epoch']}, its packing in epoch {epoch}: "
                               "iterate a dataset through one PackedLoader only")
        return {"format": PACK_FORMAT, "version": PACK_VERSION, "dataset": dataset_state, "rank": rank,
                "ranks": ranks, "documents": documents, "offset": offset, "batch_size": self._batch,
                "pack": asdict(self._pack)}

    def state_dict(self) -> dict[str, Any]:
        """Where this rank's packing stands: after the last batch delivered, or at the start of the next epoch."""
        if self._state is not None:
            return self._describe(*self._state)
        layout = self._dataset.layout()
        position = self._dataset._position
        return self._describe(self._dataset.epoch, position.start, position.skip, self._offset, layout.rank,
                              layout.ranks)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where ``state`` was taken, on the same rank of as many ranks, packing alike.

        Raises:
            ResumeMismatch: the state is not a packed state, or was taken on
                another rank or number of ranks, or with other packing
                settings or batch size (naming the field), or its counts are
                out of range.
        """
        if not isinstance(state, dict) or state.get("format") != PACK_FORMAT or state.get("version") != PACK_VERSION:
            raise ResumeMismatch(f"not a packed loader's state (format {PACK_FORMAT!r}, version {PACK_VERSION})")
        layout = self._dataset.layout()
        expected = {"rank": layout.rank, "ranks": layout.ranks, "batch_size": self._batch,
                    "pack": asdict(self._pack)}
        for name, value in expected.items():
            if state.get(name) != value:
                raise ResumeMismatch(f"packed state field {name!r} is {state.get(name)!r}, this loader has "
                                     f"{value!r}: a packed position resumes only on the same rank, ranks and packing")
        for name in ("documents", "offset"):
            value = state.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ResumeMismatch(f"packed state field {name!r} is {value!r}: must be a non-negative integer")
        self._dataset.load_state_dict(state["dataset"])
        share = self._dataset.layout().positions(sum(self._dataset._counts), self._dataset._position.start,
                                                 self._dataset._uneven).size
        if state["documents"] > share:
            raise ResumeMismatch(f"packed state field 'documents' is {state['documents']}, beyond this rank's "
                                 f"{share} documents of the epoch")
        self._dataset._position.skip = state["documents"]
        self._offset = state["offset"]
        self._state = None


def _tensors(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch as torch tensors where torch is installed (as numpy arrays otherwise)."""
    try:
        import torch
    except ImportError:
        return batch
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
