"""shard(): inputs of many formats in, one trainio dataset out, on one or several processes."""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing
import os
import queue
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from trainio.loaders import (
    Compression,
    DatasetIndex,
    ShardInfo,
    ShardSetWriter,
    commit_dataset,
    infer_columns_schema,
    prepare_destination,
)
from trainio.storage import FormatError, SchemaMismatch, Store, open_store

from ._inputs import SMALL_FILE_FORMATS, InputFile, InputFormat, find_inputs, read_batches

BatchMap = Callable[[pa.RecordBatch], Any]
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardOptions:
    """How ``shard`` writes the dataset.

    Attributes:
        shard_bytes: Shard files close at this size (default 256 MiB).
        batch_rows: Rows per record batch (default 1024).
        compression: None, "lz4" or "zstd".
        workers: Processes converting inputs in parallel (default 1); each
            takes a contiguous run of the inputs, so rows keep input order.
        map: ``"module:function"`` or ``"path/to/file.py:function"``, called
            on every record batch; it returns a RecordBatch, a Table or a
            dict of columns.
        overwrite: Replace a dataset already at the destination.
    """

    shard_bytes: int = 256 << 20
    batch_rows: int = 1024
    compression: Compression = None
    workers: int = 1
    map: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: must be >= 1")


def shard(
    inputs: Sequence[str],
    out: str | os.PathLike[str] | Store,
    *,
    format: InputFormat | None = None,  # noqa: A002 - the CLI's --format
    options: ShardOptions = ShardOptions(),
    progress: Progress | None = None,
) -> DatasetIndex:
    """Convert ``inputs`` (files, directories, globs; local or ``s3://``) into a dataset at ``out``.

    Inputs are read as streams, so memory stays bounded whatever their size.
    The rows keep the inputs' order (inputs in the order given, directories
    and globs sorted). ``progress(bytes, rows)`` is called with increments as
    inputs are read. Returns the committed index.

    Raises:
        NotFound: an input does not exist.
        FormatError: an input cannot be read in its format (naming it, and the line of a JSON lines
            input), or its (mapped) rows do not fit the schema the first input's rows set (naming it).
        AlreadyExists: a dataset is at ``out`` and ``options.overwrite`` is False.
    """
    return shard_files(find_inputs(inputs, format), out, options=options, progress=progress)


def shard_files(
    files: Sequence[InputFile],
    out: str | os.PathLike[str] | Store,
    *,
    options: ShardOptions = ShardOptions(),
    progress: Progress | None = None,
) -> DatasetIndex:
    """:func:`shard` for inputs already found with :func:`find_inputs` (so they are listed once)."""
    store = out if isinstance(out, Store) else open_store(out)
    mapper = load_map(options.map)
    schema = _first_schema(files, options.batch_rows, mapper)
    destination = prepare_destination(store, overwrite=options.overwrite)
    groups = _partition(files, min(options.workers, len(files)))
    prefixes = [destination.name_prefix] if len(groups) == 1 else [
        f"{destination.name_prefix}{g:03d}-" for g in range(len(groups))]
    if len(groups) == 1:
        shards = _convert(files, store, schema, options, prefixes[0], progress)
    else:
        shards = _convert_in_processes(groups, store, schema, options, prefixes, progress)
    return commit_dataset(destination, schema, shards, options.compression)


def load_map(spec: str | None) -> BatchMap | None:
    """The function a ``--map`` spec names (``module:function`` or ``file.py:function``).

    Raises:
        FormatError: the spec is malformed, or names nothing callable.
    """
    if spec is None:
        return None
    module_name, _, function = spec.rpartition(":")
    if not module_name or not function:
        raise FormatError(spec, "", "a map must be given as module:function or path/to/file.py:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: a module beside the command's working directory
    try:
        if module_name.endswith(".py"):
            loader_spec = importlib.util.spec_from_file_location("_trainio_map", module_name)
            if loader_spec is None or loader_spec.loader is None:
                raise ImportError(f"cannot load {module_name}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError, SyntaxError) as exc:
        raise FormatError(spec, "", f"cannot import the map's module: {exc}") from exc
    found = getattr(module, function, None)
    if not callable(found):
        raise FormatError(spec, "", f"{module_name} has no function {function!r}")
    return found  # type: ignore[no-any-return]


def _mapped(batch: pa.RecordBatch, mapper: BatchMap | None, source: InputFile) -> pa.RecordBatch | pa.Table | dict[str, Any]:
    if mapper is None:
        return batch
    try:
        result = mapper(batch)
    except Exception as exc:
        raise FormatError(source.label, "", f"the map failed on a batch of it: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, (pa.RecordBatch, pa.Table, dict)):
        raise FormatError(source.label, "", f"the map returned {type(result).__name__}, "
                          "not a RecordBatch, a Table or a dict of columns")
    return result


def _first_schema(files: Sequence[InputFile], batch_rows: int, mapper: BatchMap | None) -> pa.Schema:
    """The dataset's schema: that of the first (mapped) batch of the first input that has rows."""
    for source in files:
        batches = read_batches(source, batch_rows)
        try:
            for batch, _ in batches:
                data = _mapped(batch, mapper, source)
                return infer_columns_schema(data) if isinstance(data, dict) else data.schema
        finally:
            batches.close()
    raise FormatError(files[0].label, "", "the inputs hold no rows", "nothing to shard")


def _schema_text(schema: pa.Schema) -> str:
    """``name: type`` of every field, for messages."""
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _partition(files: Sequence[InputFile], parts: int) -> list[list[InputFile]]:
    """Contiguous runs of ``files`` of about equal total size."""
    total = sum(max(f.size, 1) for f in files)
    groups: list[list[InputFile]] = [[] for _ in range(parts)]
    done = 0
    for source in files:
        groups[min(parts - 1, done * parts // total)].append(source)
        done += max(source.size, 1)
    return [g for g in groups if g]


class _Stopped(Exception):
    """Another worker failed: this one stops and removes its shards."""


def _convert(files: Sequence[InputFile], store: Store, schema: pa.Schema, options: ShardOptions,
             prefix: str, progress: Progress | None, stop: Any = None) -> list[ShardInfo]:
    """Write the rows of ``files`` as shards named with ``prefix``; return them.

    ``stop`` (an Event, or None) is checked between batches; once set, the
    shards written so far are deleted and ``_Stopped`` is raised.
    """
    mapper = load_map(options.map)
    writer = ShardSetWriter(store, schema, shard_bytes=options.shard_bytes, batch_rows=options.batch_rows,
                            compression=options.compression, name_prefix=prefix)
    try:
        for source in files:
            reported = 0
            for batch, consumed in read_batches(source, options.batch_rows):
                if stop is not None and stop.is_set():
                    raise _Stopped()
                data = _mapped(batch, mapper, source)
                try:
                    if isinstance(data, pa.Table):
                        writer.write_table(data)
                    else:
                        writer.write_batch(data)
                except SchemaMismatch as exc:
                    raise FormatError(source.label, "", f"its rows do not fit the dataset's schema, which the first "
                                      f"input's rows set ({_schema_text(schema)}): field {exc.field!r}: expected "
                                      f"{exc.expected}, got {exc.got}",
                                      "give inputs with the same columns, or a --map that makes them alike") from exc
                if progress is not None:
                    rows = len(next(iter(data.values()), ())) if isinstance(data, dict) else data.num_rows
                    progress(consumed - reported, rows)
                reported = consumed
            if source.format not in SMALL_FILE_FORMATS:
                writer.end_batch()  # the next input's batches start aligned: no straddling batch to copy
            if progress is not None and source.size > reported:
                progress(source.size - reported, 0)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


_worker_channels: tuple[Any, Any] | None = None


def _init_worker(events: Any, stop: Any) -> None:
    global _worker_channels
    _worker_channels = (events, stop)


def _worker(files: list[InputFile], store: Store, schema: pa.Schema, options: ShardOptions,
            prefix: str) -> list[ShardInfo]:
    assert _worker_channels is not None
    events, stop = _worker_channels
    return _convert(files, store, schema, options, prefix, lambda b, r: events.put((b, r)), stop)


def _convert_in_processes(groups: list[list[InputFile]], store: Store, schema: pa.Schema, options: ShardOptions,
                          prefixes: list[str], progress: Progress | None) -> list[ShardInfo]:
    """Convert each group in its own process; on any failure, stop the others and delete every shard."""
    context = multiprocessing.get_context("spawn")
    events, stop = context.Queue(), context.Event()
    with ProcessPoolExecutor(len(groups), mp_context=context, initializer=_init_worker,
                             initargs=(events, stop)) as pool:
        futures: list[Future[list[ShardInfo]]] = [
            pool.submit(_worker, group, store, schema, options, prefix) for group, prefix in zip(groups, prefixes)]
        try:
            while True:
                done, running = wait(futures, timeout=0.2, return_when=FIRST_EXCEPTION)
                _drain(events, progress)
                if not running or any(f.exception() is not None for f in done):
                    break
            results = [f.result() for f in futures]
        except BaseException:
            stop.set()
            wait(futures)
            for f in futures:
                if not f.cancelled() and f.exception() is None:
                    for key in (key for info in f.result() for key in info.files):
                        store.delete(key)
            raise
        finally:
            _drain(events, progress)
    return [info for shards in results for info in shards]


def _drain(events: Any, progress: Progress | None) -> None:
    while True:
        try:
            read, rows = events.get_nowait()
        except queue.Empty:
            return
        if progress is not None:
            progress(read, rows)
