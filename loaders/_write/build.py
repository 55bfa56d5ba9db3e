"""build_dataset: a dataset made from any list of inputs by a function, in parallel processes, committed once."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any

import pyarrow as pa

from trainio.storage import FormatError, SchemaMismatch, Store, open_store

from .._format.index import DatasetIndex, ShardInfo
from .._sizes import parse_size
from .dataset_writer import commit_dataset, prepare_destination
from .shard_file import Compression
from .shard_set import ShardSetWriter

Sample = Mapping[str, Any]
Make = Callable[[Any], "Sample | Iterable[Sample] | None"]


def build_dataset(
    make: Make,
    inputs: Sequence[Any],
    out: str | os.PathLike[str] | Store,
    *,
    workers: int = 1,
    shard_bytes: int | str = "256MB",
    batch_rows: int = 1024,
    compression: Compression = None,
    overwrite: bool = False,
) -> DatasetIndex:
    """Write the samples ``make`` gives for each of ``inputs`` as a dataset at ``out``, in the inputs' order.

    ``make(input)`` returns one sample (a dict), an iterable of samples
    (a generator, say), or None for none. ``workers`` processes each take a
    contiguous run of the inputs (forked where the platform can, so ``make``
    need not be importable; else spawned, and it must be), writing shards of
    their own; one index listing them all commits the dataset, so it appears
    whole or not at all. The schema is inferred from the first sample.

    Raises:
        FormatError: ``make`` raised on an input (naming its number and the
            error), or returned something that is not a sample, or the runs'
            samples disagree on the schema; no dataset is left and nothing
            already at ``out`` is touched.
        AlreadyExists: a dataset is at ``out`` and ``overwrite`` is False.
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    store = out if isinstance(out, Store) else open_store(out)
    destination = prepare_destination(store, overwrite=overwrite)
    size = parse_size(shard_bytes)
    runs = [range(len(inputs) * k // workers, len(inputs) * (k + 1) // workers) for k in range(workers)]
    runs = [r for r in runs if len(r)] or [range(0)]
    prefixes = [destination.name_prefix] if len(runs) == 1 else \
        [f"{destination.name_prefix}{k:03d}-" for k in range(len(runs))]
    jobs = [(make, [inputs[i] for i in run], run.start, store, size, batch_rows, compression, prefix)
            for run, prefix in zip(runs, prefixes)]
    if len(jobs) == 1:
        results = [_write_run(*jobs[0])]
    else:
        results = _in_processes(jobs, store)
    written = [(schema, shards) for schema, shards in results if schema is not None]
    if not written:
        raise FormatError(store.url, "", "make() gave no sample for any input", "nothing to write")
    schema = written[0][0]
    for other in (s for s, _ in written[1:]):
        if not other.remove_metadata().equals(schema.remove_metadata()):
            for key in (key for _, shards in results for info in shards for key in info.files):
                store.delete(key)
            raise FormatError(store.url, "", f"the samples disagree on the schema: {schema} and {other}",
                              "make every sample with the same fields and types")
    return commit_dataset(destination, schema, [info for _, shards in results for info in shards], compression)


def _write_run(make: Make, inputs: list[Any], first: int, store: Store, shard_bytes: int, batch_rows: int,
               compression: Compression, prefix: str) -> tuple[pa.Schema | None, list[ShardInfo]]:
    """Write the samples of one run of inputs (numbered from ``first``); its schema (None without samples) and
    shards. Its shards are deleted if it fails."""
    writer = ShardSetWriter(store, shard_bytes=shard_bytes, batch_rows=batch_rows, compression=compression,
                            name_prefix=prefix)
    sources: list[int] = []  # the input number of every sample written, for messages
    try:
        for number, item in enumerate(inputs, first):
            try:
                made = make(item)
            except Exception as exc:
                raise FormatError(store.url, "", f"make() failed on input {number} ({item!r:.80}): "
                                  f"{type(exc).__name__}: {exc}") from exc
            for sample in [made] if isinstance(made, Mapping) else [] if made is None else made:
                if not isinstance(sample, Mapping):
                    raise FormatError(store.url, "", f"make() gave {type(sample).__name__} for input {number}, "
                                                     "not a sample (a dict of fields)")
                sources.append(number)
                writer.write(sample)
        if not sources:
            writer.abort()
            return None, []
        shards = writer.finish()
        return writer.schema, shards
    except SchemaMismatch as exc:  # found when its batch is checked: maybe some samples later
        writer.abort()
        source = f"input {sources[exc.row]}" if 0 <= exc.row < len(sources) else f"the inputs from {first} on"
        raise FormatError(store.url, "", f"a sample of {source} does not fit the schema of the first: field "
                          f"{exc.field!r}: expected {exc.expected}, got {exc.got}",
                          "make every sample with the same fields and types") from exc
    except BaseException:
        writer.abort()
        raise


def _in_processes(jobs: list[tuple[Any, ...]], store: Store) -> list[tuple[pa.Schema | None, list[ShardInfo]]]:
    """Each job in a process of its own; if one fails, the others' shards are deleted and its error raised."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(len(jobs), mp_context=context) as pool:
        futures = [pool.submit(_write_run, *job) for job in jobs]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is None:
            return [f.result() for f in futures]
        for future in futures:
            future.cancel()
        wait(futures)
        for future in futures:
            if not future.cancelled() and future.exception() is None:
                for info in future.result()[1]:
                    for key in info.files:
                        store.delete(key)
        error = failed.exception()
        assert error is not None
        raise error
