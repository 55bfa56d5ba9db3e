"""``shard_with_ray``: the ``shard`` conversion on a Ray Data cluster, same format and commit protocol.

Ray Data reads the inputs (its own Parquet, JSON Lines and CSV readers, local
or S3) with ``preserve_order``, applies the ``--map`` function as a batch map,
and hands each block to a task that writes it as complete shards with our
shard writer, hashing as it writes. The driver collects the tasks' shard
records, in block order, and writes ``index.json`` last.

Exactly-once: a block's shards are named after a digest of the block's
content, and every shard file is written atomically; a retried or
speculative task writes the same names with the same bytes. The index lists
the records the final attempts returned, and shard files the index does not
list (left by an attempt whose map gave other output) are deleted after the
commit.

Blocks of identical content share their shard files (listed once per block).

Order: the rows keep the inputs' order (files in the order ``find_inputs``
gives: as listed, directories and globs sorted; rows in file order) whatever
the number of workers, since the blocks are kept in input order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any

import pyarrow as pa

from trainio.loaders import (
    BatchInfo,
    DatasetIndex,
    RowDigests,
    ShardInfo,
    ShardSetWriter,
    commit_dataset,
    prepare_destination,
)
from trainio.storage import FormatError, Hasher, S3Store, Store, TrainioError, open_store

from ._inputs import InputFile, InputFormat, find_inputs
from ._sharding import ShardOptions, load_map

RAY_FORMATS = ("parquet", "jsonl", "csv")
"""Input formats the Ray engine reads (with Ray Data's own readers)."""

_RETRIES = 3
_RAISED = re.compile(r"^(?!ray\.)[A-Za-z_][\w.]*(Error|Exception|Failed|Exit): ")


class ShardTaskFailed(TrainioError):
    """A Ray task failed on every attempt; the message carries the task's own error."""


class RayNotInstalled(TrainioError, ImportError):
    """``--engine ray`` without Ray Data installed; the message says how to install it."""


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is an extra of ray
    except ImportError:
        raise RayNotInstalled("--engine ray needs Ray Data, which is not installed: "
                              "pip install 'trainio[ray]'") from None
    return ray


def ray_progress(show: bool) -> None:
    """Show Ray Data's own progress bars (on by default), or not (``--json``)."""
    _ray().data.DataContext.get_current().enable_progress_bars = show


def _filesystem(files: Sequence[InputFile]) -> tuple[Any, list[str]]:
    """A pyarrow filesystem for the inputs, and their paths on it."""
    store = files[0].store
    if any(f.store.url != store.url for f in files):
        raise FormatError(store.url, "", "the Ray engine reads inputs from one store at a time")
    if isinstance(store, S3Store):
        from pyarrow import fs

        options = store.options
        endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        scheme, _, host = (endpoint or "").partition("://")
        s3 = fs.S3FileSystem(access_key=options.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID"),
                             secret_key=options.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
                             region=options.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                             endpoint_override=host or None, scheme=scheme or "https")
        prefix = f"{store.bucket}/{store.prefix}".rstrip("/")
        return s3, [f"{prefix}/{f.key}" for f in files]
    paths = [store.local_path(f.key) for f in files]
    return None, [os.fspath(path) for path in paths if path is not None]


def _read(ray: Any, fmt: InputFormat, paths: list[str], filesystem: Any) -> Any:
    if fmt == "parquet":
        return ray.data.read_parquet(paths, filesystem=filesystem)
    if fmt == "jsonl":
        return ray.data.read_json(paths, filesystem=filesystem, lines=True)
    return ray.data.read_csv(paths, filesystem=filesystem)


def _block_name(table: pa.Table) -> str:
    """A name for a block's shards that only its content decides."""
    hasher = Hasher()
    for batch in table.to_batches():
        for column in batch.columns:
            for buffer in column.buffers():
                if buffer is not None:
                    hasher.update(memoryview(buffer))
    hasher.update(str(table.num_rows).encode())
    return hasher.hexdigest()[:20]


def _portable(store: Store) -> Any:
    """The store's options with the driver's S3 endpoint, credentials and region filled in, for the workers."""
    if not isinstance(store, S3Store):
        return None
    options = store.options
    env = os.environ.get
    return replace(options, endpoint_url=options.endpoint_url or env("AWS_ENDPOINT_URL"),
                   access_key_id=options.access_key_id or env("AWS_ACCESS_KEY_ID"),
                   secret_access_key=options.secret_access_key or env("AWS_SECRET_ACCESS_KEY"),
                   region=options.region or env("AWS_DEFAULT_REGION") or env("AWS_REGION"))


def _narrow(kind: pa.DataType) -> pa.DataType:
    """The type the local engine's readers give where Ray's give a 64-bit-offset one (large_string, ...)."""
    if pa.types.is_large_string(kind):
        return pa.string()
    if pa.types.is_large_binary(kind):
        return pa.binary()
    if pa.types.is_large_list(kind) or pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_narrow(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(_narrow(field.type)) for field in kind])
    return kind


class _BlockWriter:
    """The task body: write one block as complete shards; return their records (and the block's schema)."""

    def __init__(self, out: str, store_options: Any, prefix: str, options: ShardOptions) -> None:
        self.out, self.store_options, self.prefix, self.options = out, store_options, prefix, options

    def __call__(self, table: pa.Table) -> dict[str, list[str]]:
        if table.num_rows == 0:
            return {"shard": [], "schema": []}
        table = table.cast(pa.schema([f.with_type(_narrow(f.type)) for f in table.schema], table.schema.metadata))
        store = open_store(self.out, options=self.store_options)
        writer = ShardSetWriter(store, table.schema, shard_bytes=self.options.shard_bytes,
                                batch_rows=self.options.batch_rows, compression=self.options.compression,
                                name_prefix=f"{self.prefix}{_block_name(table)}-")
        writer.write_table(table)
        shards = writer.finish()
        schema = table.schema.serialize().to_pybytes().hex()
        return {"shard": [json.dumps(asdict(s)) for s in shards], "schema": [schema] * len(shards)}


class _Mapper:
    def __init__(self, spec: str) -> None:
        self.spec = spec

    def __call__(self, table: pa.Table) -> pa.Table:
        mapper = load_map(self.spec)
        assert mapper is not None
        result = mapper(table.combine_chunks().to_batches()[0] if table.num_rows else table)
        if isinstance(result, pa.RecordBatch):
            return pa.Table.from_batches([result])
        return result if isinstance(result, pa.Table) else pa.table(result)


def shard_with_ray(inputs: Sequence[str], out: str | os.PathLike[str], *, format: InputFormat | None = None,  # noqa: A002 - the CLI's --format
                   options: ShardOptions = ShardOptions(), address: str | None = None,
                   shards_per_task: int = 4) -> DatasetIndex:
    """Convert ``inputs`` into a dataset at ``out`` on Ray Data; the same dataset ``shard`` writes.

    Connects to the Ray cluster at ``address`` ("auto", "ray://host:10001")
    unless Ray is already initialized (None starts a local one). Each task
    writes one block of at most ``shards_per_task`` shards' worth of rows.
    Returns the committed index.

    Raises:
        RayNotInstalled: Ray Data is not installed (the message says how to install it).
        FormatError: an input is not Parquet, JSON Lines or CSV, or the inputs' schemas differ.
        ShardTaskFailed: a task failed on every attempt; nothing is committed.
    """
    if shards_per_task < 1:
        raise ValueError(f"shards_per_task={shards_per_task}: must be >= 1")
    files = find_inputs(inputs, format)
    formats = {f.format for f in files}
    if len(formats) != 1 or not formats <= set(RAY_FORMATS):
        raise FormatError(files[0].label, "", f"the Ray engine reads one of {', '.join(RAY_FORMATS)} at a time, "
                          f"not {sorted(formats)}", "use --engine local for the other formats")
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    store = out if isinstance(out, Store) else open_store(out)
    destination = prepare_destination(store, overwrite=options.overwrite)
    filesystem, paths = _filesystem(files)
    if options.map is not None:
        load_map(options.map)  # a bad spec fails here, not in every task
    writer = _BlockWriter(store.url, _portable(store), destination.name_prefix, options)
    # Blocks in input order, of at most shards_per_task shards; a task whose code raised is retried
    # (not only one whose worker died). Restored afterwards: the context is the caller's Ray session's.
    with _data_context(ray, preserve_order=True, target_max_block_size=shards_per_task * options.shard_bytes,
                       max_map_retries=_RETRIES, retried_map_errors=True):
        dataset = _read(ray, formats.pop(), paths, filesystem)
        if options.map is not None:
            dataset = dataset.map_batches(_Mapper(options.map), batch_size=None, batch_format="pyarrow")
        records = dataset.map_batches(writer, batch_size=None, batch_format="pyarrow", zero_copy_batch=True)
        try:
            rows = records.take_all()
        except Exception as exc:  # noqa: BLE001 - Ray wraps the task's error; report it, commit nothing
            raise ShardTaskFailed(_task_error(exc)) from exc
    if not rows:
        raise FormatError(files[0].label, "", "the inputs hold no rows")
    schemas = {row["schema"] for row in rows}
    if len(schemas) > 1:
        raise FormatError(files[0].label, "", "the inputs (or the map's output) do not all have one schema")
    schema = pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(schemas.pop())))
    shards = [_shard_info(json.loads(row["shard"])) for row in rows]
    index = commit_dataset(destination, schema, shards, options.compression)
    listed = {key for s in shards for key in s.files} | set(destination.replaced)
    for key in store.list("shards"):
        if key not in listed:
            store.delete(key)  # a failed attempt's shard that its retry did not write again
    return index


@contextmanager
def _data_context(ray: Any, *, preserve_order: bool, **settings: Any) -> Iterator[None]:
    """Ray Data's context with ``settings`` for the block, as it was afterwards."""
    context = ray.data.DataContext.get_current()
    saved = {name: getattr(context, name) for name in settings}
    saved_order = context.execution_options.preserve_order
    try:
        for name, value in settings.items():
            setattr(context, name, value)
        context.execution_options.preserve_order = preserve_order
        yield
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
        context.execution_options.preserve_order = saved_order


def _shard_info(record: dict[str, Any]) -> ShardInfo:
    batches = tuple(BatchInfo(**b) for b in record.pop("batches"))
    rows = record.pop("row_xxh3", None)
    row_xxh3 = RowDigests(rows["path"], tuple(rows["fields"]), rows["xxh3_128"]) if rows else None
    return ShardInfo(**record, batches=batches, row_xxh3=row_xxh3)


def _task_error(exc: BaseException) -> str:
    """The task's own error, found in Ray's wrapping, on one line."""
    found = [line.strip() for line in str(exc).splitlines() if _RAISED.match(line.strip())]
    text = found[-1] if found else str(exc).strip().splitlines()[0]
    return f"a Ray task failed after {_RETRIES + 1} attempts: {text}"
