"""Read throughput of trainio's Loader and StreamingDataset against the limits and the peers, on the same samples.

Two synthetic workloads, each written once (untimed) by every contender's own writer, before timing:

- tokens: ``--size`` bytes (rounded up to whole samples) of samples of 2048 random int32 token ids, 8192
  payload bytes each; trainio stores them as a ``list<int32>`` column ``tokens``;
- images: about ``--image-size`` bytes of samples of 90-110 KB of random bytes (a ``binary`` column
  ``image``); GB/s counts the exact total of those lengths.

Every contender reads every sample once per epoch, page-cache warm (its files are read once before its
runs), after one untimed warm-up epoch; a run is one epoch, and the table shows the median of at least
``--repeat`` runs (``--peer-repeat``, default 1, for the peers), more until the timed runs add up to
``--min-seconds`` (short epochs vary more). GB/s counts payload bytes only (10**9): padding is not
counted (padded images count their ``<name>_lengths``), and every run's sample and byte counts are checked
against the workload's, untimed. ``torch.set_num_threads(1)`` is set in this process and, by a
``worker_init_fn``, in every DataLoader worker, for every contender alike. The contenders, per workload and
per order (in order, and shuffled where the contender can):

- numpy memcpy, the physical limit: ``np.copyto`` of the workload's payload bytes in pieces of one batch
  (64 samples' bytes), from one large array to another, both allocated and touched before timing;
- pyarrow IPC, the practical limit: trainio's shard files opened before timing (``pa.memory_map`` +
  ``ipc.open_file``, kept open); in order, each record batch's values copied into one preallocated numpy
  buffer; shuffled, the record batches in a random order and within each its rows in a random order,
  gathered into that buffer (``np.take(rows2d, perm, axis=0, out=...)`` for tokens, one copy per row for
  images);
- trainio ``Loader(StreamingDataset(path, shuffle=...), batch_size=64, device="cpu")`` (default options:
  token lists padded, images packed; images also with ``lists="pad"``, the target applying to the default) in
  this process, one loader iterated every epoch as a trainer does, its ``metrics()["wait_s"]`` recorded; and
  ``for sample in StreamingDataset(...)`` per sample in this process; ``set_epoch`` before each epoch;
- trainio ``StreamingDataset(..., batch_size=64)`` in a stock ``DataLoader(batch_size=64, num_workers=2,
  persistent_workers=True)`` with the default collate, against that DataLoader's own ceiling: the same
  DataLoader over a minimal IterableDataset of the raw Arrow shards (batches of 64 rows dealt round-robin
  to the workers, each copied, or gathered when shuffled in the pyarrow way above, from the memory-mapped
  record batch into a shared-memory tensor as the default collate allocates it; ``batch_size=None``);
- trainio's first epoch from scratch ("fresh"): each run opens a new ``StreamingDataset`` and ``Loader`` (batch
  64) and reads one epoch, or a new ``StreamingDataset`` per sample, with every local shard hashed against the
  index before its first sample is delivered ("checked", as in training) and without ("unchecked", the
  benchmark-only switch ``trainio.loaders._read.shard_check.CHECK_LOCAL_SHARDS``); the process forgets the shards it
  has checked before every run, so each one pays the whole check. Checked and unchecked run in turn, an epoch
  of each, per order; the target is checked <= 1.10 x the unchecked time. The warm fresh Loader rows also run in
  turn with the pyarrow pass above with its shards opened (mapped) inside each run, as the Loader's are: the
  checked Loader's target adds >= 0.9 x that pass (issue 23 point 1). Page-cache warm (the dataset read
  before), and cold (", cold": the dataset's pages evicted with ``posix_fadvise(DONTNEED)`` before every run,
  untimed: a first epoch of data read once, as pretraining reads it). The cold fresh Loader rows run in turn
  with two reads of the shard files, also cold: a sequential ``read()`` (8 MiB calls, one file after another:
  issue 23's limit) and the kernel told every file will be read, then 8 MiB blocks read by as many threads as
  the Loader's and its checker's (``trainio bench``'s limit, faster on a disk that wants several requests at
  once); the checked Loader's target adds >= 0.9 x the faster read (issue 23 point 2), its read-ahead at its
  default bound (``read_ahead_bytes``, 256 MB: measure it on a dataset of at least 1 GB);
- MosaicML Streaming (``MDSWriter``; its ``StreamingDataset(local=..., remote=None, batch_size=64)``),
  LitData (``optimize``; its ``StreamingDataset``) and WebDataset (``ShardWriter`` tar shards, raw ``.bin``
  members; ``WebDataset(urls, shardshuffle=...)``, ``.shuffle(1000)`` when shuffled): per sample in this
  process, and in the same DataLoader (LitData's own ``StreamingDataLoader``) unless ``--no-peer-dataloader``;
  and each peer's first epoch from scratch ("fresh, first epoch per sample"): a new dataset per run, read per
  sample, page cache warm and cold as trainio's fresh rows.
  A peer that does not import, write or read is skipped, with the reason in the table.

All shards close at 256 MiB. Every DataLoader forks its workers (explicitly: LitData's ``optimize`` sets the
global start method to spawn). Persistent workers' start-up is not timed. Contenders run one after
another, each set up (and its buffers touched) untimed and torn down before the next, except trainio's
DataLoader rows and their ceiling, which run interleaved (an epoch of each in turn, per order), so that a
drift of the machine over their minutes of epochs hits them alike. ``--json`` prints every run; ``--only``
picks contenders by name, e.g. ``--only "trainio Loader,pyarrow,memcpy"``.

Run:  python benchmarks/loader_bench.py [--size 1.5GB] [--image-size 1.5GB] [--repeat 3] [--min-seconds 2]
      [--peer-repeat 1] [--dir DIR] [--keep [--reuse]] [--workloads tokens,images] [--only NAME,...]
      [--no-peer-dataloader] [--seed 0] [--json]
Quick:  python benchmarks/loader_bench.py --size 256MB --image-size 256MB --repeat 1 --min-seconds 0
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _report as harness  # type: ignore[import-not-found]  # beside this script
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainio.loaders import DatasetWriter, Loader, StreamingDataset, parse_size
from trainio.loaders._read import shard_check as _shard_check  # CHECK_LOCAL_SHARDS: the unchecked rows' switch
from trainio.loaders._read.cold_hash import resident_share
from trainio.loaders._read.dataset import map_file
from trainio.tools._bench_limits import drop_from_page_cache, read_files
from trainio.tools._bench_run import LOADER_THREADS

TOKENS, VOCAB = 2048, 50257
IMAGE_BYTES = (90_000, 110_000)      # each image sample's length is drawn uniformly from this range
BATCH, WORKERS = 64, 2
SHARD_BYTES = 256 << 20              # trainio's default shard_bytes; every writer closes its shards here
MAX_EPOCHS = 25                      # timed epochs of one contender, at most (see --min-seconds)
CHECK_PAIR_RUNS = 15                 # timed epochs, at least, of a fresh Loader row judged by checked/unchecked time
WDS_SHUFFLE = 1000                   # WebDataset's sample shuffle buffer
VERSIONS = ("pyarrow", "numpy", "torch", "trainio", "mosaicml-streaming", "litdata", "webdataset")
IN_ORDER, SHUFFLED = "in order", "shuffled"
FORK = "fork"  # every DataLoader's start method, explicitly: LitData's optimize() sets the global one to spawn
NOTES = [
    "samples/s and GB/s (payload bytes, 10**9) are the median of at least --repeat one-epoch runs "
    "(--peer-repeat for MosaicML, LitData and WebDataset), more until they add up to --min-seconds (at most "
    f"{MAX_EPOCHS}), each contender after one untimed warm-up epoch, page-cache warm; "
    "'vs memcpy' divides by the memcpy row of the same workload. The timed epochs run back to back, as in "
    "training (one gc.collect() before the first): a pause before an epoch costs this VM's idle vCPUs a slow "
    "first few ms, 3-5% of a 0.15 s epoch. Each batch's samples and bytes are counted from its shape "
    "(len, nbytes); the epoch's totals must equal the workload's exactly or the row is flagged.",
    "'in-process': one Python process iterating per sample (or, for Loader, per batch with its own producer "
    "thread); 'DataLoader': torch's DataLoader, batch 64, 2 persistent workers, default collate (the ceiling: "
    "batch_size=None over batches it cuts itself). torch.set_num_threads(1) everywhere, on 2 cores.",
    "Targets (tokens): Loader >= 10 GB/s in order, >= 8 GB/s shuffled; per-sample StreamingDataset >= 500k "
    "samples/s in order, >= 400k shuffled, and >= 4x LitData's per-sample rate in the same order. Images: "
    "Loader >= 8 GB/s either way. Both: StreamingDataset in a DataLoader >= 0.90 x that DataLoader's ceiling.",
    "Per-sample rows touch each sample's payload object only (its nbytes or len): where a contender hands out "
    "zero-copy views of memory-mapped files (trainio's list columns, LitData's mmap'd chunks) no payload byte "
    "is read, while binary values (bytes objects) and MosaicML's and WebDataset's file reads are copies.",
    "The DataLoader ceiling is bound by the DataLoader's own transport (every batch tensor a new shared-memory "
    "segment, passed to the main process by file descriptor), not by reading the shards. It and trainio's "
    "DataLoader rows run interleaved, an epoch of each in turn.",
    "'fresh' rows: a new dataset (and Loader) per run, timed from opening index.json to the epoch's last batch, "
    "the shards' check not hidden by the per-process record of checked shards (forgotten before every run); "
    "checked and unchecked alternate run by run; ', cold' rows evict the dataset's pages before every run.",
    "Shuffles differ: trainio shuffles shards then samples within 2**18-sample windows; the pyarrow rows and "
    "the ceiling shuffle record-batch order and rows within each 1024-row record batch; MosaicML uses its "
    "default py1e shuffle; LitData its chunk-then-sample shuffle; WebDataset shuffles shards and then a "
    "1000-sample buffer.",
    "Images: the Loader's default batches pack the images end to end (a uint8 tensor plus offsets); with "
    "lists='pad' every image is padded to its batch's longest (no target on that row; GB/s counts only the "
    "image bytes, the padding is copied besides); in the DataLoader, trainio's samples (bytes) collate into lists of "
    "bytes, pickled through the worker queue, while the ceiling sends one shared-memory uint8 tensor plus "
    "offsets per batch. MosaicML and LitData get bytes columns; WebDataset raw .bin members.",
]


# -- the workloads ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One synthetic workload: its samples are generated in chunks, the same for every writer."""

    name: str             # "tokens" or "images"
    column: str           # trainio's column name
    samples: int
    payload: int          # exact payload bytes of all samples
    chunk: int            # samples per generated chunk

    def chunks(self) -> Iterator[tuple[int, int]]:
        """(chunk number, samples in it)."""
        for k, start in enumerate(range(0, self.samples, self.chunk)):
            yield k, min(self.chunk, self.samples - start)


def image_lengths(k: int, n: int) -> np.ndarray:
    return np.random.default_rng([11, k]).integers(IMAGE_BYTES[0], IMAGE_BYTES[1] + 1, n)


def make_workload(name: str, size: int) -> Workload:
    if name == "tokens":
        samples = max(BATCH, -(-size // (4 * TOKENS)))
        return Workload(name, "tokens", samples, samples * 4 * TOKENS, 8192)
    samples = max(BATCH, size // ((IMAGE_BYTES[0] + IMAGE_BYTES[1]) // 2))
    work = Workload(name, "image", samples, 0, 256)
    payload = sum(int(image_lengths(k, n).sum()) for k, n in work.chunks())
    return Workload(name, "image", samples, payload, 256)


def token_chunk(k: int, n: int) -> np.ndarray:
    """Chunk ``k``: an (n, 2048) int32 array of random token ids."""
    return np.random.default_rng([7, k]).integers(0, VOCAB, (n, TOKENS), dtype=np.int32)


def image_chunk(k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ``k``: the images' bytes end to end (uint8) and their n + 1 offsets (int64)."""
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(image_lengths(k, n), out=offsets[1:])
    values = np.frombuffer(np.random.default_rng([13, k]).bytes(int(offsets[-1])), dtype=np.uint8)
    return values, offsets


def sample_dicts(kind: str, k: int, n: int, key: str) -> Iterator[dict[str, Any]]:
    """The samples of chunk ``k`` as dicts ``{key: value}``: tokens as int32 arrays, images as bytes."""
    if kind == "tokens":
        for row in token_chunk(k, n):
            yield {key: row}
    else:
        values, offsets = image_chunk(k, n)
        data = values.tobytes()
        for i in range(n):
            yield {key: data[offsets[i]:offsets[i + 1]]}


# -- writers (untimed) ----------------------------------------------------------------------------------------


def write_trainio(work: Workload, out: Path) -> None:
    with DatasetWriter(out) as writer:
        for k, n in work.chunks():
            if work.name == "tokens":
                offsets = pa.array(np.arange(0, (n + 1) * TOKENS, TOKENS, dtype=np.int32))
                column: pa.Array = pa.ListArray.from_arrays(offsets, pa.array(token_chunk(k, n).reshape(-1)))
            else:
                values, offs = image_chunk(k, n)
                column = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offs.astype(np.int32)),
                                                                pa.py_buffer(values)])
            writer.write_batch({work.column: column})


def load_streaming() -> tuple[Any, Any, str]:
    """MosaicML's MDSWriter and StreamingDataset, and a note when ``import streaming`` failed (torchvision)."""
    note = ""
    try:
        package = importlib.import_module("streaming")
    except Exception as exc:  # noqa: BLE001 - e.g. a torchvision build that does not match torch
        spec = importlib.util.find_spec("streaming")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(str(exc)) from exc
        package = types.ModuleType("streaming")  # streaming.base needs no torchvision
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["streaming"] = package
        note = f"streaming.base imported directly (`import streaming`: {type(exc).__name__})"
    writer = importlib.import_module("streaming.base.format.mds.writer").MDSWriter
    dataset = importlib.import_module("streaming.base.dataset").StreamingDataset
    try:
        importlib.import_module("streaming.base.util").clean_stale_shared_memory()
    except Exception:  # noqa: BLE001 - best effort: a killed earlier run may have left some
        pass
    return writer, dataset, note


def write_mds(writer_class: Any, work: Workload, out: Path) -> None:
    encoding = f"ndarray:int32:{TOKENS}" if work.name == "tokens" else "bytes"
    with writer_class(out=str(out), columns={work.column: encoding}, size_limit=SHARD_BYTES) as writer:
        for k, n in work.chunks():
            for sample in sample_dicts(work.name, k, n, work.column):
                writer.write(sample)


def litdata_samples(item: tuple[str, str, int, int]) -> Iterator[dict[str, Any]]:
    """LitData's ``fn``: the samples of one chunk (module level, so its spawned workers can import it)."""
    kind, key, k, n = item
    yield from sample_dicts(kind, k, n, key)


def write_litdata(work: Workload, out: Path) -> None:
    optimize = importlib.import_module("litdata").optimize
    optimize(fn=litdata_samples, inputs=[(work.name, work.column, k, n) for k, n in work.chunks()],
             output_dir=str(out), chunk_bytes=SHARD_BYTES, num_workers=WORKERS, verbose=False, mode="overwrite")


def write_wds(work: Workload, out: Path) -> None:
    wds = importlib.import_module("webdataset")
    out.mkdir(parents=True)
    index = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=SHARD_BYTES, maxcount=1 << 40, verbose=0) as sink:
        for k, n in work.chunks():
            for sample in sample_dicts(work.name, k, n, "bin"):
                value = sample["bin"]
                sink.write({"__key__": f"{index:010d}", "bin": value.tobytes() if work.name == "tokens" else value})
                index += 1


# -- what a run counts ------------------------------------------------------------------------------------------


def nbytes(value: Any) -> int:
    """Payload bytes of a value: an array's or tensor's nbytes, a bytes object's length, a list's sum."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return int(value.nbytes)


def count(value: Any) -> tuple[int, int]:
    """(samples, payload bytes) of one batch's field: a tensor/array (rows on axis 0) or a list."""
    return len(value), nbytes(value)


def itemsize(value: Any) -> int:
    return int(value.itemsize) if isinstance(value, np.ndarray) else int(value.element_size())


def loader_count(batch: dict[str, Any], key: str, padded: bool = False) -> tuple[int, int]:
    """(samples, payload bytes) of a Loader or ``collate()`` batch, at the cost of reading two attributes.

    A packed field's values are exactly its bytes; the token rows all have one length, so their padded
    ``(batch, width)`` tensor is too (were a batch padded, the epoch's total would differ from the payload,
    which aborts the run). ``padded`` batches (the images with ``lists='pad'``) count their lengths instead.
    """
    value = batch[key]
    if padded:
        lengths = batch[f"{key}_lengths"]
        return len(lengths), int(lengths.sum()) * itemsize(value)
    offsets = batch.get(f"{key}_offsets")
    return (len(value) if offsets is None else len(offsets) - 1), value.nbytes


@dataclass
class Tally:
    """What one run read."""

    samples: int = 0
    bytes: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def per_sample(samples: Iterable[Any], value: Callable[[Any], Any]) -> Tally:
    """Iterate per sample; touch each sample's payload (``value``) and count its bytes."""
    tally = Tally()
    n = b = 0
    for sample in samples:
        b += nbytes(value(sample))
        n += 1
    tally.samples, tally.bytes = n, b
    return tally


def per_batch(batches: Iterable[Any], value: Callable[[Any], tuple[int, int]]) -> Tally:
    tally = Tally()
    for batch in batches:
        n, b = value(batch)
        tally.samples += n
        tally.bytes += b
    return tally


def field_of(key: str) -> Callable[[Any], Any]:
    return lambda sample: sample[key]


def wds_tokens(sample: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(sample["bin"], dtype=np.int32)


def one_thread(_: int) -> None:
    """Every DataLoader worker's ``worker_init_fn``: one intra-op thread, as in the main process."""
    torch.set_num_threads(1)


def data_loader(dataset: Any, *, batch_size: int | None = BATCH, **kwargs: Any) -> DataLoader[Any]:
    return DataLoader(dataset, batch_size=batch_size, num_workers=WORKERS, persistent_workers=True,
                      worker_init_fn=one_thread, multiprocessing_context=FORK, **kwargs)


# -- the limits -------------------------------------------------------------------------------------------------


def memcpy(src: np.ndarray, dst: np.ndarray, piece: int, samples: int) -> Tally:
    for start in range(0, src.size, piece):
        np.copyto(dst[start:start + piece], src[start:start + piece])
    return Tally(samples, src.size)


def memcpy_threads(src: np.ndarray, dst: np.ndarray, piece: int, samples: int, threads: int) -> Tally:
    """The same copy, its pieces dealt round-robin to ``threads`` threads (np.copyto releases the GIL)."""
    def part(first: int) -> None:
        for start in range(first * piece, src.size, threads * piece):
            np.copyto(dst[start:start + piece], src[start:start + piece])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, range(threads)))
    return Tally(samples, src.size)


def open_shards(root: Path) -> list[Any]:
    return [ipc.open_file(pa.memory_map(str(p))) for p in sorted((root / "shards").glob("*.arrow"))]


def record_batches(readers: list[Any], rng: np.random.Generator | None) -> Iterator[pa.Array]:
    """The first column of every record batch of every shard, in file order or (with ``rng``) a random order."""
    where = [(s, b) for s, r in enumerate(readers) for b in range(r.num_record_batches)]
    order = rng.permutation(len(where)).tolist() if rng is not None else range(len(where))
    for i in order:
        s, b = where[i]
        yield readers[s].get_batch(b).column(0)


def token_rows(column: pa.Array) -> np.ndarray:
    """A list<int32> column of 2048-token rows as an (n, 2048) view of its Arrow buffer."""
    offsets = column.offsets.to_numpy()
    return column.values.to_numpy()[offsets[0]:offsets[-1]].reshape(len(column), TOKENS)


def binary_parts(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A binary column's data buffer (uint8 view) and offsets."""
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset:column.offset + len(column) + 1]
    return np.frombuffer(column.buffers()[2], dtype=np.uint8), offsets


def pyarrow_read(readers: list[Any], kind: str, out: np.ndarray, shuffle: bool, seed: int) -> Tally:
    """Every sample's payload copied (in order) or gathered (shuffled) into ``out``."""
    rng = np.random.default_rng(seed) if shuffle else None
    pos = samples = 0
    for column in record_batches(readers, rng):
        n = len(column)
        if kind == "tokens":
            rows = token_rows(column)
            target = out[pos:pos + rows.nbytes].view(np.int32).reshape(n, TOKENS)
            if rng is None:
                np.copyto(target, rows)
            else:
                np.take(rows, rng.permutation(n), axis=0, out=target, mode="clip")
            pos += rows.nbytes
        else:
            data, offsets = binary_parts(column)
            if rng is None:
                size = int(offsets[-1] - offsets[0])
                np.copyto(out[pos:pos + size], data[offsets[0]:offsets[-1]])
                pos += size
            else:
                starts, ends = offsets[:-1].tolist(), offsets[1:].tolist()
                for r in rng.permutation(n).tolist():
                    size = ends[r] - starts[r]
                    np.copyto(out[pos:pos + size], data[starts[r]:ends[r]])
                    pos += size
        samples += n
    return Tally(samples, pos)


def shared_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor in shared memory, allocated as the default collate allocates its output in a worker."""
    elem = torch.empty(0, dtype=dtype)
    return elem.new(elem._typed_storage()._new_shared(numel, device=elem.device)).resize_(numel)


class ArrowBatches(IterableDataset[dict[str, torch.Tensor]]):
    """The DataLoader ceiling: batches cut straight from the memory-mapped Arrow shards, no per-sample work.

    Batches of ``batch`` rows (never across record batches) are dealt round-robin to the workers; each is one
    copy (tokens in order, images in order) or one gather (shuffled) into a shared-memory tensor.
    """

    def __init__(self, root: Path, kind: str, batch: int, shuffle: bool, seed: int) -> None:
        self.root, self.kind, self.batch, self.shuffle, self.seed = root, kind, batch, shuffle, seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers, me = (1, 0) if info is None else (info.num_workers, info.id)
        readers = open_shards(self.root)
        rng = np.random.default_rng(self.seed) if self.shuffle else None  # the same in every worker
        dealt = 0
        for column in record_batches(readers, rng):
            n = len(column)
            perm = rng.permutation(n) if rng is not None else None
            for start in range(0, n, self.batch):
                end = min(start + self.batch, n)
                if dealt % workers == me:
                    yield self._cut(column, start, end, perm)
                dealt += 1

    def _cut(self, column: pa.Array, start: int, end: int, perm: np.ndarray | None) -> dict[str, torch.Tensor]:
        n = end - start
        if self.kind == "tokens":
            rows = token_rows(column)
            out = shared_empty(n * TOKENS, torch.int32).view(n, TOKENS)
            if perm is None:
                np.copyto(out.numpy(), rows[start:end])
            else:
                np.take(rows, perm[start:end], axis=0, out=out.numpy(), mode="clip")
            return {"tokens": out}
        data, offsets = binary_parts(column)
        picked = np.arange(start, end) if perm is None else perm[start:end]
        lengths = offsets[picked + 1] - offsets[picked]
        bounds = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        out = shared_empty(int(bounds[-1]), torch.uint8)
        target = out.numpy()
        if perm is None:
            np.copyto(target, data[offsets[start]:offsets[end]])
        else:
            for i, r in enumerate(picked.tolist()):
                np.copyto(target[bounds[i]:bounds[i + 1]], data[offsets[r]:offsets[r + 1]])
        return {"image": out, "image_offsets": torch.from_numpy(bounds)}


def ceiling_count(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    if "tokens" in batch:
        return count(batch["tokens"])
    return len(batch["image_offsets"]) - 1, batch["image"].nbytes


# -- contenders -------------------------------------------------------------------------------------------------


@dataclass
class Contender(harness.Contender):
    """One way of reading one workload in one order: ``run(epoch)`` is timed; ``setup``/``teardown`` are not."""

    workload: str
    order: str
    name: str
    mode: str                                  # "limit", "in-process", "DataLoader" or "fresh"
    run: Callable[[int], Tally]
    files: Path | None = None                  # read once, untimed, before the first run (page cache)
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None
    before: Callable[[], None] = lambda: None  # untimed, before every run (the cold rows evict the files)
    together: str = ""                         # a "fresh" row measured in turn with the rows of this name
    min_runs: int = 0                          # timed runs, at least (a row judged by the ratio of two medians)
    tallies: list[Tally] = field(default_factory=list)


class Holder:
    """An object a contender builds in ``setup`` and drops in ``teardown`` (so peers' state never overlaps)."""

    def __init__(self, make: Callable[[], Any], close: Callable[[Any], None] = lambda _: None) -> None:
        self.make, self.close, self.value = make, close, None

    def setup(self) -> None:
        self.value = self.make()

    def teardown(self) -> None:
        if self.value is not None:
            self.close(self.value)
        self.value = None
        gc.collect()


def shutdown_loader(loader: Any) -> None:
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def trainio_contenders(work: Workload, path: Path, seed: int) -> list[Contender]:
    found: list[Contender] = []
    key = work.column
    for order, shuffle in ((IN_ORDER, False), (SHUFFLED, True)):
        ds = Holder(lambda shuffle=shuffle: StreamingDataset(path, shuffle=shuffle, seed=seed))
        # Images also padded (the default packs binary): the cost of padding every image to its batch's longest.
        for lists in ("auto", "pad") if work.name == "images" else ("auto",):
            batches = Holder(lambda shuffle=shuffle, lists=lists: Loader(
                StreamingDataset(path, shuffle=shuffle, seed=seed), batch_size=BATCH, device="cpu", lists=lists))

            def loader_run(epoch: int, batches: Holder = batches, padded: bool = lists == "pad") -> Tally:
                loader = batches.value
                loader.dataset.set_epoch(epoch)
                tally = per_batch(loader, lambda batch: loader_count(batch, key, padded))
                tally.extra = {"wait_s": loader.metrics()["wait_s"]}
                return tally

            name = "trainio Loader (batch 64, cpu)" + (", lists='pad'" if lists == "pad" else "")
            found.append(Contender(work.name, order, name, "in-process", loader_run, path, batches.setup,
                                   batches.teardown))

        def sample_run(epoch: int, ds: Holder = ds) -> Tally:
            ds.value.set_epoch(epoch)
            return per_sample(ds.value, field_of(key))

        found.append(Contender(work.name, order, "trainio StreamingDataset, per sample", "in-process", sample_run,
                               path, ds.setup, ds.teardown))
    for order, shuffle in ((IN_ORDER, False), (SHUFFLED, True)):
        ceiling = Holder(lambda shuffle=shuffle: data_loader(ArrowBatches(path, work.name, BATCH, shuffle, seed),
                                                             batch_size=None), shutdown_loader)
        ours = Holder(lambda shuffle=shuffle: data_loader(StreamingDataset(path, shuffle=shuffle, seed=seed,
                                                                            batch_size=BATCH)), shutdown_loader)
        collated = Holder(lambda shuffle=shuffle: collating_loader(path, shuffle, seed), shutdown_loader)
        found += [
            Contender(work.name, order, "DataLoader ceiling: raw Arrow batches", "DataLoader",
                      lambda _, h=ceiling: per_batch(h.value, ceiling_count), path, ceiling.setup, ceiling.teardown),
            Contender(work.name, order, "trainio StreamingDataset in DataLoader", "DataLoader",
                      lambda _, h=ours: per_batch(h.value, lambda b: count(b[key])), path, ours.setup, ours.teardown),
            Contender(work.name, order, "trainio StreamingDataset in DataLoader, collate_fn=ds.collate()",
                      "DataLoader", lambda _, h=collated: per_batch(h.value, lambda b: loader_count(b, key)), path,
                      collated.setup, collated.teardown),
        ]
    return found


FRESH = "fresh dataset + Loader, first epoch"
FRESH_SAMPLES = "fresh StreamingDataset, first epoch per sample"
FRESH_DATALOADER = f"fresh StreamingDataset in DataLoader ({WORKERS} workers), first epoch"
FRESH_WORKERS = f"fresh dataset + Loader(workers={WORKERS}), first epoch"
PEER_FRESH = "fresh, first epoch per sample"
PYARROW_FRESH = "pyarrow IPC batch read, shards opened in the run"
COLD = ", cold"  # the dataset's pages evicted from the page cache before every run
SEQUENTIAL_READ = "sequential read() of the shard files, cold"
PARALLEL_READ = f"read of the shard files, {LOADER_THREADS + 1} threads, WILLNEED first, cold"


def evict(path: Path) -> None:
    """Drop ``path``'s files from the page cache (as after a reboot, or data read once long ago): untimed. A shard
    of which more than 5% stays in memory (something still maps it) is reported: that run is not wholly cold."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    drop_from_page_cache(files)
    for file in files:
        if file.suffix == ".arrow" and file.stat().st_size:
            share = resident_share(map_file(file))
            if share > 0.05:
                print(f"  not evicted: {share:.0%} of {file} is still in memory (still mapped)", file=sys.stderr)


def sequential_read(work: Workload, path: Path) -> Tally:
    """Every shard file read once, one after the other, in 8 MiB ``read()`` calls (issue 23's limit for a cold
    first epoch): the bytes that hold the workload's samples."""
    read_files(sorted((path / "shards").glob("*.arrow")), 1, advise=False)
    return Tally(work.samples, work.payload)


def parallel_read(work: Workload, path: Path) -> Tally:
    """The shard files read as ``trainio bench`` bounds its cold loader row: the kernel told first that every file
    will be read, then as many threads as the Loader's and its checker's reading 8 MiB blocks."""
    read_files(sorted((path / "shards").glob("*.arrow")), LOADER_THREADS + 1)
    return Tally(work.samples, work.payload)


def fresh_contenders(work: Workload, path: Path, seed: int) -> list[Contender]:
    """A new StreamingDataset (and Loader) per run, timed from opening the dataset to the end of its first epoch,
    with every local shard hashed against the index before its first sample (checked) and without (unchecked,
    the benchmark-only switch). The process forgets which shards it has checked before every run, so each one
    pays the check a training job pays in its first epoch: from the page cache (the dataset read before, by
    another process), and cold (its pages evicted before every run: a first epoch as pretraining reads it)."""
    found: list[Contender] = []
    key = work.column

    def fresh_loader(epoch: int, shuffle: bool, checked: bool) -> Tally:
        _shard_check.forget_verified()
        _shard_check.CHECK_LOCAL_SHARDS = checked
        try:
            loader = Loader(StreamingDataset(path, shuffle=shuffle, seed=seed + epoch), batch_size=BATCH, device="cpu")
            _KEPT_PAST_TIMING.append(loader)
            tally = per_batch(loader, lambda batch: loader_count(batch, key))
            tally.extra = {"wait_s": loader.metrics()["wait_s"]}
            return tally
        finally:
            _shard_check.CHECK_LOCAL_SHARDS = True

    def fresh_samples(epoch: int, shuffle: bool, checked: bool) -> Tally:
        _shard_check.forget_verified()
        _shard_check.CHECK_LOCAL_SHARDS = checked
        try:
            dataset = StreamingDataset(path, shuffle=shuffle, seed=seed + epoch)
            _KEPT_PAST_TIMING.append(dataset)
            return per_sample(dataset, field_of(key))
        finally:
            _shard_check.CHECK_LOCAL_SHARDS = True

    def fresh_dataloader(epoch: int, shuffle: bool, checked: bool) -> Tally:
        """A new dataset in a new stock DataLoader (workers forked for it, not persistent)."""
        _shard_check.forget_verified()
        _shard_check.CHECK_LOCAL_SHARDS = checked  # the forked workers inherit the switch
        try:
            dataset = StreamingDataset(path, shuffle=shuffle, seed=seed + epoch, batch_size=BATCH)
            loader = DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS, worker_init_fn=one_thread,
                                multiprocessing_context=FORK)
            _KEPT_PAST_TIMING.append(dataset)
            return per_batch(loader, lambda batch: count(batch[key]))
        finally:
            _shard_check.CHECK_LOCAL_SHARDS = True

    def fresh_workers(epoch: int, shuffle: bool, checked: bool) -> Tally:
        """A new dataset and a new Loader handing batches over from worker processes (no transform)."""
        _shard_check.forget_verified()
        _shard_check.CHECK_LOCAL_SHARDS = checked
        loader = Loader(StreamingDataset(path, shuffle=shuffle, seed=seed + epoch), batch_size=BATCH,
                        workers=WORKERS)
        _KEPT_PAST_TIMING.append(loader)  # its workers stopped then
        try:
            return per_batch(loader, lambda batch: loader_count(batch, key))
        finally:
            _shard_check.CHECK_LOCAL_SHARDS = True

    buffer = Holder(lambda: np.full(work.payload, 0, dtype=np.uint8))
    for order, shuffle in ((IN_ORDER, False), (SHUFFLED, True)):  # issue 23's reference: maps opened in the run too
        found.append(Contender(work.name, order, PYARROW_FRESH, "fresh",
                               lambda epoch, shuffle=shuffle: pyarrow_read(open_shards(path), work.name, buffer.value,
                                                                           shuffle, seed + epoch),
                               path, buffer.setup, buffer.teardown, note="the practical limit, fresh maps",
                               together=f"trainio {FRESH}"))
        found.append(Contender(work.name, order, SEQUENTIAL_READ, "fresh", lambda _: sequential_read(work, path),
                               path, before=lambda: evict(path), note="issue 23's limit, page cache cold",
                               together=f"trainio {FRESH}{COLD}"))
        found.append(Contender(work.name, order, PARALLEL_READ, "fresh", lambda _: parallel_read(work, path),
                               path, before=lambda: evict(path), note="the Loader's and checker's threads' limit",
                               together=f"trainio {FRESH}{COLD}"))
    for cold in (False, True):
        for order, shuffle in ((IN_ORDER, False), (SHUFFLED, True)):
            for name, run in ((FRESH, fresh_loader), (FRESH_SAMPLES, fresh_samples), (FRESH_WORKERS, fresh_workers),
                              (FRESH_DATALOADER, fresh_dataloader)):
                for checked in (True, False):
                    label = (COLD if cold else "") + (", checked" if checked else ", unchecked")
                    found.append(Contender(work.name, order, f"trainio {name}{label}", "fresh",
                                           lambda epoch, s=shuffle, c=checked, run=run: run(epoch, s, c),
                                           None if cold else path,
                                           before=(lambda: evict(path)) if cold else (lambda: None),
                                           min_runs=CHECK_PAIR_RUNS if name in (FRESH, FRESH_WORKERS) else 0))
    return found


def peer_fresh(work: Workload, order: str, peer: str, make: Callable[[int], Iterable[Any]], path: Path,
               skip: str) -> list[Contender]:
    """A peer's first epoch from scratch, per sample: ``make(epoch)`` opens a new dataset each run, timed from
    there to the epoch's end, page cache warm and cold (as trainio's "fresh" rows)."""
    def run(epoch: int) -> Tally:
        dataset = make(epoch)
        try:
            return per_sample(dataset, field_of(work.column))
        finally:
            del dataset
            gc.collect()  # a peer that keeps shared state per directory must let the next run open anew

    return [Contender(work.name, order, f"{peer} {PEER_FRESH}{COLD if cold else ''}", "fresh", run,
                      None if cold else path, before=(lambda: evict(path)) if cold else (lambda: None), skip=skip)
            for cold in (False, True)]


def collating_loader(path: Path, shuffle: bool, seed: int) -> DataLoader[Any]:
    """A stock DataLoader over our StreamingDataset whose batches are built by the dataset's own collate."""
    dataset = StreamingDataset(path, shuffle=shuffle, seed=seed, batch_size=BATCH)
    return data_loader(dataset, collate_fn=dataset.collate())


def limit_contenders(work: Workload, path: Path, seed: int) -> list[Contender]:
    """memcpy and the pyarrow reads; their buffers are allocated and touched in setup."""
    piece = -(-work.payload * BATCH // work.samples)  # one batch's bytes
    copy = Holder(lambda: (np.full(work.payload, 1, dtype=np.uint8), np.full(work.payload, 0, dtype=np.uint8)))
    found = [Contender(work.name, "-", f"numpy memcpy ({piece >> 10} KiB pieces)", "limit",
                       lambda _: memcpy(copy.value[0], copy.value[1], piece, work.samples), None, copy.setup,
                       copy.teardown, note="the physical limit"),
             Contender(work.name, "-", f"numpy memcpy, 2 threads ({piece >> 10} KiB pieces)", "limit",
                       lambda _: memcpy_threads(copy.value[0], copy.value[1], piece, work.samples, 2), None,
                       copy.setup, copy.teardown, note="both cores, as the Loader's two threads")]
    for order, shuffle in ((IN_ORDER, False), (SHUFFLED, True)):
        state = Holder(lambda: (open_shards(path), np.full(work.payload, 0, dtype=np.uint8)))
        found.append(Contender(work.name, order, "pyarrow IPC batch read", "limit",
                               lambda epoch, s=state, shuffle=shuffle: pyarrow_read(s.value[0], work.name, s.value[1],
                                                                                    shuffle, seed + epoch),
                               path, state.setup, state.teardown, note="the practical limit"))
    return found


def mds_contenders(work: Workload, path: Path, dataset_class: Any, seed: int, skip: str,
                   with_loader: bool) -> list[Contender]:
    found: list[Contender] = []
    key = work.column
    for order, shuffle in ((IN_ORDER, False), (SHUFFLED, True)):
        def make(shuffle: bool = shuffle) -> Any:
            return dataset_class(local=str(path), remote=None, shuffle=shuffle, shuffle_seed=seed, batch_size=BATCH)

        ds = Holder(make)
        found.append(Contender(work.name, order, "MosaicML StreamingDataset, per sample", "in-process",
                               lambda _, h=ds: per_sample(h.value, field_of(key)), path, ds.setup, ds.teardown,
                               skip=skip))
        found += peer_fresh(work, order, "MosaicML StreamingDataset", lambda epoch, shuffle=shuffle: dataset_class(
            local=str(path), remote=None, shuffle=shuffle, shuffle_seed=seed + epoch, batch_size=BATCH), path, skip)
        if with_loader:
            dl = Holder(lambda make=make: data_loader(make()), shutdown_loader)
            found.append(Contender(work.name, order, "MosaicML StreamingDataset in DataLoader", "DataLoader",
                                   lambda _, h=dl: per_batch(h.value, lambda b: count(b[key])), path, dl.setup,
                                   dl.teardown, skip=skip))
    return found


def litdata_contenders(work: Workload, path: Path, seed: int, skip: str, with_loader: bool) -> list[Contender]:
    found: list[Contender] = []
    key = work.column
    for order, shuffle in ((IN_ORDER, False), (SHUFFLED, True)):
        def make(shuffle: bool = shuffle) -> Any:
            return importlib.import_module("litdata").StreamingDataset(str(path), shuffle=shuffle, seed=seed)

        ds = Holder(make)

        def sample_run(epoch: int, h: Holder = ds) -> Tally:
            h.value.set_epoch(epoch + 1)  # LitData counts epochs from 1
            return per_sample(h.value, field_of(key))

        found.append(Contender(work.name, order, "LitData StreamingDataset, per sample", "in-process", sample_run,
                               path, ds.setup, ds.teardown, skip=skip))
        found += peer_fresh(work, order, "LitData StreamingDataset", lambda epoch, shuffle=shuffle: importlib.import_module(
            "litdata").StreamingDataset(str(path), shuffle=shuffle, seed=seed + epoch), path, skip)
        if with_loader:
            def make_loader(make: Callable[[], Any] = make) -> Any:
                return importlib.import_module("litdata").StreamingDataLoader(
                    make(), batch_size=BATCH, num_workers=WORKERS, persistent_workers=True, worker_init_fn=one_thread,
                    multiprocessing_context=FORK)

            dl = Holder(make_loader, shutdown_loader)
            found.append(Contender(work.name, order, "LitData StreamingDataLoader", "DataLoader",
                                   lambda _, h=dl: per_batch(h.value, lambda b: count(b[key])), path, dl.setup,
                                   dl.teardown, skip=skip))
    return found


def wds_pipeline(urls: list[str], shuffle: bool, seed: int, kind: str) -> Any:
    wds = importlib.import_module("webdataset")
    ds = wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, seed=seed, empty_check=False)
    if shuffle:
        ds = ds.shuffle(WDS_SHUFFLE)
    return ds.map(wds_tokens_sample if kind == "tokens" else wds_image_sample)


def wds_tokens_sample(sample: dict[str, Any]) -> dict[str, Any]:
    return {"tokens": wds_tokens(sample)}


def wds_image_sample(sample: dict[str, Any]) -> dict[str, Any]:
    return {"image": sample["bin"]}


def wds_contenders(work: Workload, path: Path, seed: int, skip: str, with_loader: bool) -> list[Contender]:
    found: list[Contender] = []
    key = work.column
    urls = Holder(lambda: [str(p) for p in sorted(path.glob("*.tar"))])
    for order, shuffle in ((IN_ORDER, False), (SHUFFLED, True)):
        def sample_run(epoch: int, shuffle: bool = shuffle) -> Tally:
            return per_sample(wds_pipeline(urls.value, shuffle, seed + epoch, work.name), field_of(key))

        found.append(Contender(work.name, order, "WebDataset, per sample", "in-process", sample_run, path,
                               urls.setup, urls.teardown,
                               note="tokens decoded with np.frombuffer" if work.name == "tokens" else "", skip=skip))
        found += peer_fresh(work, order, "WebDataset", lambda epoch, shuffle=shuffle: wds_pipeline(
            [str(p) for p in sorted(path.glob("*.tar"))], shuffle, seed + epoch, work.name), path, skip)
        if with_loader:
            def make_loader(shuffle: bool = shuffle) -> Any:
                return data_loader(wds_pipeline([str(p) for p in sorted(path.glob("*.tar"))], shuffle, seed,
                                                work.name))

            dl = Holder(make_loader, shutdown_loader)
            found.append(Contender(work.name, order, "WebDataset in DataLoader", "DataLoader",
                                   lambda _, h=dl: per_batch(h.value, lambda b: count(b[key])), path, dl.setup,
                                   dl.teardown, note="shards split by worker", skip=skip))
    return found


# -- running ----------------------------------------------------------------------------------------------------


def warm_cache(path: Path | None) -> None:
    """Read every file under ``path`` once, so the timed runs are page-cache warm."""
    if path is None:
        return
    buffer = bytearray(16 << 20)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


ABORTS = ("trainio", "DataLoader ceiling", "pyarrow", "numpy")  # contenders whose failure aborts the run


def measure(group: list[Contender], work: Workload, repeat: int, min_seconds: float) -> None:
    """Set up the contenders of ``group`` and warm the cache, then run them an epoch each in turn: one untimed
    round, then at least ``repeat`` timed ones, and more (up to MAX_EPOCHS) until each contender's add up to
    ``min_seconds`` and each has its ``min_runs``; check every run's counts. Contenders measured together meet the same drift of the
    machine, which keeps their ratios fair."""
    live = [c for c in group if not c.skip]
    started = list(live)
    runs: dict[int, list[str]] = {id(c): [] for c in live}
    try:
        for c in started:
            attempt(c, live, lambda c=c: (c.setup(), warm_cache(c.files)))
        epoch = 0
        while live and (epoch <= repeat or (epoch <= MAX_EPOCHS and (
                min(sum(c.seconds) for c in live) < min_seconds or any(len(c.seconds) < c.min_runs for c in live)))):
            if epoch < 2:  # then the timed epochs back to back, as a trainer runs them (see NOTES)
                gc.collect()
            for c in list(live):
                attempt(c, live, lambda c=c, epoch=epoch: run_epoch(c, epoch, work, runs[id(c)]))
            epoch += 1
    finally:
        for c in started:
            c.teardown()
    for c in live:
        print(f"  {c.workload:6} {c.order:8} {c.name:42} {' '.join(runs[id(c)])} s", file=sys.stderr)


_KEPT_PAST_TIMING: list[Any] = []
"""What a fresh run made (its dataset, loader): closed and dropped once its time is taken, as a job does not tear
its loader down at the end of its first epoch (unmapping 1.5 GB of shards takes 60 ms here)."""


def run_epoch(c: Contender, epoch: int, work: Workload, runs: list[str]) -> None:
    """Run one epoch of ``c`` (timed unless it is the warm-up, epoch 0) and check what it read."""
    c.before()
    start = time.perf_counter()
    tally = c.run(epoch)
    seconds = time.perf_counter() - start
    for made in _KEPT_PAST_TIMING:
        if isinstance(made, Loader):
            made.close()
    _KEPT_PAST_TIMING.clear()
    if epoch:
        c.seconds.append(seconds)
        c.tallies.append(tally)
    runs.append(f"{seconds:.2f}")
    if (tally.samples, tally.bytes) != (work.samples, work.payload):
        message = f"read {tally.samples} samples, {tally.bytes} bytes; expected {work.samples}, {work.payload}"
        if c.name.startswith(ABORTS):
            raise SystemExit(f"benchmark aborted: {c.name} ({c.workload}, {c.order}): {message}")
        c.note = "; ".join(filter(None, [c.note, message]))


def attempt(c: Contender, live: list[Contender], step: Callable[[], Any]) -> None:
    """Run ``step`` of ``c``: a peer that fails is reported (and leaves ``live``); trainio's failures abort."""
    try:
        step()
    except SystemExit:
        raise
    except Exception as exc:
        if c.name.startswith(ABORTS):
            raise
        traceback.print_exc()
        c.give_up(exc)
        c.tallies.clear()
        live.remove(c)


def measured_together(found: list[Contender]) -> list[list[Contender]]:
    """The contenders in groups measured together: trainio's DataLoader rows with their ceiling, per order
    (the rows a ratio target compares); every other contender alone."""
    groups: list[list[Contender]] = []
    shared: dict[tuple[str, str], list[Contender]] = {}
    for c in found:
        if c.mode == "DataLoader" and c.name.startswith(("trainio", "DataLoader ceiling")):
            together = (c.mode, c.order)
        elif c.mode == "fresh":  # checked and unchecked (and the fresh pyarrow pass) in turn, a run of each per round
            together = (c.together or c.name.rsplit(", ", 1)[0], c.order)
        else:
            groups.append([c])
            continue
        if together not in shared:
            shared[together] = []
            groups.append(shared[together])
        shared[together].append(c)
    return groups


def machine(root: Path) -> dict[str, Any]:
    return {**harness.machine(VERSIONS), "dir": str(root)}


def run_workload(work: Workload, root: Path, args: argparse.Namespace, notes: list[str]) -> list[Contender]:
    """Write every contender's copy of ``work`` (untimed), then measure every contender in turn."""
    base = root / work.name
    paths = {name: base / name for name in ("trainio", "mds", "litdata", "wds")}
    skips: dict[str, str] = {}
    mds_dataset, mds_note = None, ""
    try:
        mds_writer, mds_dataset, mds_note = load_streaming()
        if mds_note and f"MosaicML: {mds_note}." not in notes:
            notes.append(f"MosaicML: {mds_note}.")
    except Exception as exc:  # noqa: BLE001 - whatever stops it importing is the reason in the table
        skips["mds"] = harness.reason(exc)
    for name, module in (("litdata", "litdata"), ("wds", "webdataset")):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001
            skips[name] = harness.reason(exc)
    writers: dict[str, Callable[[], None]] = {
        "trainio": lambda: write_trainio(work, paths["trainio"]),
        "mds": lambda: write_mds(mds_writer, work, paths["mds"]),
        "litdata": lambda: write_litdata(work, paths["litdata"]),
        "wds": lambda: write_wds(work, paths["wds"]),
    }
    seed, loaders = args.seed, not args.no_peer_dataloader
    found = limit_contenders(work, paths["trainio"], seed) + trainio_contenders(work, paths["trainio"], seed)
    found += fresh_contenders(work, paths["trainio"], seed)
    found += mds_contenders(work, paths["mds"], mds_dataset, seed, skips.get("mds", ""), loaders)
    found += litdata_contenders(work, paths["litdata"], seed, skips.get("litdata", ""), loaders)
    found += wds_contenders(work, paths["wds"], seed, skips.get("wds", ""), loaders)
    found = [c for c in found if selected(args, c)]
    needed = {c.files for c in found if not c.skip} | {paths["trainio"]}  # the limits read trainio's shards
    for name, path in paths.items():
        if path not in needed or (args.reuse and path.exists()):
            continue
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        try:
            writers[name]()
        except Exception as exc:  # a peer that cannot write is reported
            if name == "trainio":
                raise
            traceback.print_exc()
            for c in found:
                if c.files == path:
                    c.skip = harness.reason(exc, "write failed", 140)
            continue
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        print(f"  wrote {work.name} for {name}: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
    os.sync()  # the copies' dirty pages are written back before any timing
    for group in measured_together(found):
        peer = any(c.files is not None and c.files != paths["trainio"] for c in group)
        measure(group, work, args.peer_repeat if peer else args.repeat, args.min_seconds)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return found


def selected(args: argparse.Namespace, c: Contender) -> bool:
    return not args.only or any(s.lower() in c.name.lower() for s in args.only)


# -- the report -------------------------------------------------------------------------------------------------


def target_of(c: Contender) -> tuple[str, str]:
    """(kind, threshold): 'gbps', 'sps' or 'ceiling'; '' when the row has no target."""
    if c.name == "trainio Loader (batch 64, cpu)":
        return "gbps", "10" if (c.workload, c.order) == ("tokens", IN_ORDER) else "8"
    if c.name.startswith("trainio StreamingDataset, per sample") and c.workload == "tokens":
        return "sps", "500000" if c.order == IN_ORDER else "400000"
    if c.name.startswith("trainio StreamingDataset in DataLoader"):
        return "ceiling", "0.9"
    if c.name == f"trainio {FRESH}, checked":
        return "unchecked+pyarrow", "1.10"
    if c.name == f"trainio {FRESH}{COLD}, checked":
        return "unchecked+read", "1.10"
    if c.mode == "fresh" and c.name.endswith(", checked"):
        return "unchecked", "1.10"
    return "", ""


def target_text(kind: str, threshold: str) -> str | None:
    if kind == "gbps":
        return f">= {threshold} GB/s"
    if kind == "sps":
        return f">= {int(threshold) // 1000}k/s, 4x LitData"
    if kind == "ceiling":
        return f">= {threshold} x ceiling"
    if kind == "unchecked":
        return f"<= {threshold} x unchecked time"
    if kind == "unchecked+pyarrow":
        return f"<= {threshold} x unchecked time, >= 0.9 x fresh pyarrow"
    if kind == "unchecked+read":
        return f"<= {threshold} x unchecked time, >= 0.9 x the faster read"
    return None


def summarize(found: list[Contender], works: dict[str, Workload]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    rates: dict[tuple[str, str, str], float] = {}
    for c in found:
        if c.seconds:
            rates[(c.workload, c.order, c.name)] = statistics.median(c.seconds)
    for c in found:
        work = works[c.workload]
        row: dict[str, Any] = {"workload": c.workload, "order": c.order, "contender": c.name, "mode": c.mode,
                               "note": c.skip or c.note, "seconds": [round(s, 4) for s in c.seconds],
                               "samples": work.samples, "payload_bytes": work.payload}
        kind, threshold = target_of(c)
        row["target"] = target_text(kind, threshold)
        if c.seconds:
            median = statistics.median(c.seconds)
            row.update(samples_per_s=work.samples / median, gb_per_s=work.payload / median / 1e9,
                       tallies=[{"samples": t.samples, "bytes": t.bytes, **t.extra} for t in c.tallies])
            memcpy_s = next((v for (w, _, n), v in rates.items() if w == c.workload and n.startswith("numpy")), None)
            row["vs_memcpy"] = memcpy_s / median if memcpy_s else None
            notes = [] if not row["note"] else [row["note"]]
            met: bool | None = None
            if kind == "gbps":
                met = row["gb_per_s"] >= float(threshold)
            elif kind == "sps":
                met = row["samples_per_s"] >= float(threshold)
                lit = rates.get((c.workload, c.order, "LitData StreamingDataset, per sample"))
                if lit:
                    factor = lit / median
                    row["vs_litdata"] = factor
                    notes.append(f"{factor:.2f}x LitData")
                    met = met and factor >= 4
            elif kind.startswith("unchecked"):
                unchecked = rates.get((c.workload, c.order, c.name.replace(", checked", ", unchecked")))
                if unchecked:
                    row["vs_unchecked"] = median / unchecked
                    met = row["vs_unchecked"] <= float(threshold)
                    notes.append(f"{row['vs_unchecked']:.3f} x unchecked time")
                pyarrow = rates.get((c.workload, c.order, PYARROW_FRESH))
                if kind == "unchecked+pyarrow" and pyarrow:  # issue 23 point 1: >= 0.9 x the pass, both fresh
                    row["vs_pyarrow_fresh"] = pyarrow / median
                    met = bool(met) and row["vs_pyarrow_fresh"] >= 0.9
                    notes.append(f"{row['vs_pyarrow_fresh']:.2f} x fresh pyarrow")
                reads = {name: rates.get((c.workload, c.order, limit))
                         for name, limit in (("sequential", SEQUENTIAL_READ), ("parallel", PARALLEL_READ))}
                if kind == "unchecked+read" and all(reads.values()):  # issue 23 point 2: >= 0.9 x the read, cold
                    for name, seconds in reads.items():
                        row[f"vs_{name}_read"] = seconds / median
                        notes.append(f"{seconds / median:.2f} x {name} read")
                    met = bool(met) and min(row["vs_sequential_read"], row["vs_parallel_read"]) >= 0.9
            elif kind == "ceiling":
                ceiling = rates.get((c.workload, c.order, "DataLoader ceiling: raw Arrow batches"))
                if ceiling:
                    row["vs_ceiling"] = ceiling / median
                    met = row["vs_ceiling"] >= float(threshold)
                    notes.append(f"{row['vs_ceiling']:.2f} x ceiling")
            if c.tallies and "wait_s" in c.tallies[0].extra:
                wait = statistics.median(t.extra["wait_s"] for t in c.tallies)
                row["wait_s"] = wait
                low, high = (work.payload / s / 1e9 for s in (max(c.seconds), min(c.seconds)))
                notes.append(f"waited {wait:.3f} s of {median:.3f} s; {len(c.seconds)} epochs, "
                             f"{low:.1f}-{high:.1f} GB/s")
            row["met"] = met
            row["note"] = "; ".join(notes)
        rows.append(row)
    return rows


def render(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [*harness.machine_lines(m, m['dir']),
             "workloads: " + "; ".join(f"{w['name']}: {w['samples']} samples, {w['payload'] / 1e9:.3f} GB payload"
                                       for w in s["workloads"])
             + f"; batch {s['batch']}, {s['workers']} DataLoader workers; median of at least {s['repeat']} "
             f"epochs (peers: {s['peer_repeat']}), more until {s['min_seconds']:g} s of them", ""]
    table = [["workload", "order", "contender", "mode", "samples/s", "GB/s", "vs memcpy", "target", "met?",
              "note"]]
    for r in report["rows"]:
        target = r["target"] or "-"
        if "samples_per_s" in r:
            met = harness.yes_no(r["met"])
            ratio = "-" if r["vs_memcpy"] is None else f"{r['vs_memcpy']:.2f}"
            table.append([r["workload"], r["order"], r["contender"], r["mode"], f"{r['samples_per_s']:,.0f}",
                          f"{r['gb_per_s']:.2f}", ratio, target, met, r["note"]])
        else:
            table.append([r["workload"], r["order"], r["contender"], r["mode"], "-", "-", "-", target, "-",
                          r["note"]])
    return harness.report_text(lines + harness.markdown_table(table, left=(0, 1, 2, 3, 7, 9)), report["notes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1.5GB"),
                        help="token workload payload (default 1.5GB, rounded up to whole samples)")
    parser.add_argument("--image-size", type=parse_size, default=parse_size("1.5GB"),
                        help="image workload payload, about (default 1.5GB)")
    parser.add_argument("--repeat", type=int, default=3, help="timed epochs per contender (default 3)")
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="more timed epochs than --repeat (up to %d) until they add up to this (default 2): "
                             "short epochs vary more" % MAX_EPOCHS)
    parser.add_argument("--peer-repeat", type=int, default=1,
                        help="timed epochs per peer contender (MosaicML, LitData, WebDataset; default 1)")
    parser.add_argument("--workloads", default="tokens,images", help="which workloads (default tokens,images)")
    parser.add_argument("--only", type=lambda s: [p for p in s.split(",") if p], default=[],
                        help="run only the contenders whose name contains one of these (comma separated); "
                             "the limits' names are 'numpy memcpy' and 'pyarrow'")
    parser.add_argument("--no-peer-dataloader", action="store_true",
                        help="read the peers per sample in-process only, not also in a DataLoader")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for every contender (default 0)")
    parser.add_argument("--dir", type=Path,
                        help="the data go in DIR/trainio-loader-bench (default: a new temp dir); removed after")
    parser.add_argument("--keep", action="store_true", help="do not remove the written data")
    parser.add_argument("--reuse", action="store_true",
                        help="with --dir and --keep: reuse copies an earlier run left there (same sizes!)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--transforms", action="store_true",
                        help="run only the transform rows (benchmarks/_transform_rows.py): JPEG decode + crop + "
                             "flip and the raw hand-off, trainio's workers against a DataLoader's")
    parser.add_argument("--jpegs", type=int, default=4000, help="JPEG files of the transform rows (default 4000)")
    parser.add_argument("--raw-size", type=parse_size, default=parse_size("1GB"),
                        help="payload of the transform rows' raw hand-off workload (default 1GB)")
    parser.add_argument("--workers", type=int, default=WORKERS, help=f"worker processes (default {WORKERS})")
    parser.add_argument("--packing", action="store_true",
                        help="run only the token packing rows (benchmarks/_packing_rows.py), on --size of documents")
    args = parser.parse_args(argv)
    if args.transforms or args.packing:
        return side_rows(args)
    names = [w for w in args.workloads.split(",") if w]
    if min(args.repeat, args.peer_repeat, args.size, args.image_size) < 1 or not names \
            or not set(names) <= {"tokens", "images"}:
        parser.error("--repeat, --peer-repeat and the sizes must be >= 1; --workloads takes tokens and/or images")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*non-writable.*")  # torch.from_numpy of read-only Arrow views
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # else LitData asks pypi.org
    if args.dir is None:
        root = Path(tempfile.mkdtemp(prefix="trainio-loader-bench-"))
    else:  # a fixed name inside --dir, so --reuse finds it; only it is ever removed
        root = args.dir / "trainio-loader-bench"
        root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DATA_OPTIMIZER_CACHE_FOLDER", str(root / "litdata-cache" / "chunks"))
    os.environ.setdefault("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(root / "litdata-cache" / "data"))
    works = {name: make_workload(name, args.size if name == "tokens" else args.image_size) for name in names}
    found: list[Contender] = []
    notes = list(NOTES)
    try:
        info = machine(root)
        for work in works.values():
            found += run_workload(work, root, args, notes)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    settings = {"workloads": [{"name": w.name, "samples": w.samples, "payload": w.payload} for w in works.values()],
                "batch": BATCH, "workers": WORKERS, "repeat": args.repeat, "min_seconds": args.min_seconds,
                "peer_repeat": args.peer_repeat, "seed": args.seed,
                "shard_bytes": SHARD_BYTES, "torch_threads": 1}
    report = {"machine": info, "settings": settings, "rows": summarize(found, works), "notes": notes}
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def side_rows(args: argparse.Namespace) -> int:
    """The transform rows or the packing rows alone (benchmarks/_transform_rows.py, _packing_rows.py)."""
    import _packing_rows
    import _transform_rows

    root = Path(tempfile.mkdtemp(prefix="trainio-loader-bench-", dir=args.dir))
    try:
        if args.transforms:
            found = _transform_rows.rows(root, args.workers, args.jpegs, args.raw_size, args.repeat)
            table = _transform_rows.render(found)
        else:
            found = _packing_rows.rows(root, args.size, args.repeat)
            table = _packing_rows.render(found)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(found, indent=1) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
