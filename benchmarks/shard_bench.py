"""Throughput of ``trainio shard`` against plain pyarrow and the peers' dataset writers, on the same rows.

The same synthetic, token-like rows (``id`` int64, ``text`` of 150-250 chars, ``tokens`` a list<int32> of
384-640 ids) are written once, before timing, as ``--files`` Parquet files and as many JSON Lines files.
Each contender converts one input format on the same local disk:

- ``trainio shard``: ``trainio.tools._sharding.shard`` in-process, as ``trainio shard DIR --out OUT`` runs it,
  and with ``ShardOptions(workers=2)`` as ``--workers 2`` (hashed, fsync'd Arrow IPC shards, then index.json);
- pyarrow, the practical limit: ``ParquetFile.iter_batches`` / ``pyarrow.json.open_json`` straight into
  ``pyarrow.ipc.new_file``, one file per input, each fsync'd; no hashing, no re-batching, no index;
- MosaicML Streaming's ``MDSWriter`` and LitData's ``optimize`` (1 and 2 workers), fed row dicts (tokens as
  numpy arrays) from the same pyarrow readers, where they are installed; a missing one is skipped, with
  the reason in the table.

All close shards at ``--shard-bytes``. They run in turn, the order reversed on every other repeat, each after
``os.sync()``; every output's row count is checked untimed (trainio's with ``verify_dataset``). The table shows
the median of ``--repeat`` runs: rows/s, and MB/s of *input* bytes; ``--json`` prints every run.

Run:  python benchmarks/shard_bench.py [--size 1GB] [--files 8] [--repeat 3] [--shard-bytes 256MiB]
      [--local-dir DIR] [--inputs parquet,jsonl] [--json]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import _report as harness  # type: ignore[import-not-found]  # beside this script
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq
from _files import fsync_path  # type: ignore[import-not-found]  # beside this script

from trainio.loaders import parse_size, verify_dataset
from trainio.tools._inputs import InputFormat
from trainio.tools._sharding import ShardOptions, shard

_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
_TEXT_CHARS, _TOKENS, _VOCAB = (150, 251), (384, 641), 50257
_ROW_BYTES = 8 + 200 + 2 * 512 + 70  # a row in Parquet: the token ids dictionary-encode to 16 bits
_GROUP_ROWS = 16384                   # rows per generated batch and Parquet row group
BATCH_ROWS = 1024                     # trainio's default batch_rows; the baseline reads Parquet in these too
VERSIONS = ("pyarrow", "numpy", "xxhash", "trainio", "torch", "mosaicml-streaming", "litdata")
NOTES = [
    "rows/s and MB/s are the median of --repeat runs; MB/s counts the input format's bytes (10**6). "
    "'vs pyarrow' divides by the pyarrow row of the same input; CPU s adds the children's CPU time.",
    "trainio and pyarrow fsync every file they write; MDSWriter and LitData do not, and their dirty pages "
    "are written back after the clock stops (every run starts after os.sync()).",
    "pyarrow infers list<int64> tokens from JSON, so every JSON Lines output holds int64 token ids.",
    "MDSWriter and LitData get one Python dict per row (tokens a numpy view) from the same pyarrow readers; "
    "LitData runs workers in spawned processes, and its order of rows is not kept.",
]


@dataclass(frozen=True)
class Workload:
    """The input files of each format (the same rows in each), and their total sizes."""

    rows: int
    files: dict[str, list[Path]]
    bytes: dict[str, int]


def synthetic_batch(rng: np.random.Generator, first_id: int, n: int) -> pa.RecordBatch:
    """``n`` rows of ids, random lowercase text and random token ids, built without Python loops."""
    text_offsets = np.concatenate([[0], np.cumsum(rng.integers(*_TEXT_CHARS, n))]).astype(np.int32)
    chars = _ALPHABET[rng.integers(0, _ALPHABET.size, int(text_offsets[-1]))]
    text = pa.StringArray.from_buffers(n, pa.py_buffer(text_offsets), pa.py_buffer(chars.tobytes()))
    token_offsets = np.concatenate([[0], np.cumsum(rng.integers(*_TOKENS, n))]).astype(np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(token_offsets),
                                      pa.array(rng.integers(0, _VOCAB, int(token_offsets[-1]), dtype=np.int32)))
    ids = pa.array(np.arange(first_id, first_id + n, dtype=np.int64))
    return pa.record_batch([ids, text, tokens], names=["id", "text", "tokens"])


def jsonl_lines(batch: pa.RecordBatch) -> bytes:
    """The rows of ``batch`` as compact JSON Lines."""
    def line(row: dict[str, Any]) -> str:
        tokens = ",".join(map(str, row["tokens"].tolist()))
        return f'{{"id":{row["id"]},"text":{json.dumps(row["text"])},"tokens":[{tokens}]}}\n'
    return "".join(map(line, row_dicts(batch))).encode()


def make_workload(root: Path, size: int, files: int) -> Workload:
    """About ``size`` bytes of Parquet in ``files`` files, and the same rows as JSON Lines."""
    rng = np.random.default_rng(3)
    rows = max(files, size // _ROW_BYTES)
    paths = {fmt: [root / "in" / fmt / f"part-{i:04d}.{fmt}" for i in range(files)] for fmt in ("parquet", "jsonl")}
    for fmt_paths in paths.values():
        fmt_paths[0].parent.mkdir(parents=True)
    done = 0
    for i in range(files):
        end = rows * (i + 1) // files
        with pq.ParquetWriter(paths["parquet"][i], synthetic_batch(rng, 0, 1).schema) as parquet, \
                open(paths["jsonl"][i], "wb") as jsonl:
            while done < end:
                batch = synthetic_batch(rng, done, min(_GROUP_ROWS, end - done))
                parquet.write_batch(batch)
                jsonl.write(jsonl_lines(batch))
                done += batch.num_rows
    return Workload(rows, paths, {fmt: sum(p.stat().st_size for p in ps) for fmt, ps in paths.items()})
def read_batches(path: Path, fmt: str) -> Iterator[pa.RecordBatch]:
    """The plain pyarrow readers: Parquet in ``BATCH_ROWS`` batches, JSON Lines in open_json's blocks."""
    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
    else:
        yield from pajson.open_json(path)


def row_dicts(batch: pa.RecordBatch) -> Iterator[dict[str, Any]]:
    """One dict per row, as the peers' writers take them: int, str, and tokens as a numpy view."""
    ids, texts = batch.column(0).to_numpy().tolist(), batch.column(1).to_pylist()
    offsets, values = batch.column(2).offsets.to_numpy(), batch.column(2).values.to_numpy()
    for i in range(batch.num_rows):
        yield {"id": ids[i], "text": texts[i], "tokens": values[offsets[i]:offsets[i + 1]]}


def pyarrow_convert(files: list[Path], fmt: str, out: Path) -> None:
    """Each input straight into one Arrow IPC file, fsync'd; then the directory is fsync'd."""
    out.mkdir()
    for i, path in enumerate(files):
        target, writer = out / f"part-{i:05d}.arrow", None
        with pa.OSFile(str(target), "wb") as sink:
            for batch in read_batches(path, fmt):
                writer = writer or ipc.new_file(sink, batch.schema)
                writer.write_batch(batch)
            if writer is not None:
                writer.close()
        fsync_path(target)
    fsync_path(out)


def pyarrow_rows(out: Path) -> int:
    readers = [ipc.open_file(pa.memory_map(str(path))) for path in sorted(out.glob("*.arrow"))]
    return sum(r.get_batch(i).num_rows for r in readers for i in range(r.num_record_batches))


def trainio_convert(src: str, fmt: str, options: ShardOptions, out: Path) -> None:
    shard([src], out, format=cast(InputFormat, fmt), options=options)


def trainio_ray_convert(src: str, fmt: str, options: ShardOptions, out: Path) -> None:
    from trainio.tools import shard_with_ray

    shard_with_ray([src], out, format=cast(InputFormat, fmt), options=options)


def ray_contenders(work: Workload, formats: list[str], shard_bytes: int) -> list[Contender]:
    """trainio's local engine (1 and 2 processes) against its Ray engine on a local Ray of every core, and the limit."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)  # untimed, as a cluster would be
    ray.data.DataContext.get_current().enable_progress_bars = False
    options = {w: ShardOptions(workers=w, shard_bytes=shard_bytes) for w in (1, 2)}
    found: list[Contender] = []
    for fmt in formats:
        files, src = work.files[fmt], str(work.files[fmt][0].parent)
        found += [
            Contender(fmt, "trainio shard", partial(trainio_convert, src, fmt, options[1]), trainio_rows),
            Contender(fmt, "trainio shard --workers 2", partial(trainio_convert, src, fmt, options[2]), trainio_rows),
            Contender(fmt, f"trainio shard --engine ray ({os.cpu_count()} CPUs)",
                      partial(trainio_ray_convert, src, fmt, options[1]), trainio_rows),
            Contender(fmt, "pyarrow -> ipc.new_file", partial(pyarrow_convert, files, fmt), pyarrow_rows,
                      note="the limit: no hash, no index"),
        ]
    return found


def trainio_rows(out: Path) -> int:
    report = verify_dataset(out, workers=2)
    if not report.ok:
        raise SystemExit(f"benchmark aborted: trainio verify {out}: {report.problems[:3]}")
    return int(report.rows)


def load_mds_writer() -> tuple[Any, str]:
    """MDSWriter, and a note when the package's ``__init__`` could not be imported (it imports torchvision)."""
    try:
        return importlib.import_module("streaming").MDSWriter, ""
    except Exception as exc:  # noqa: BLE001 - e.g. a torchvision build that does not match torch
        spec = importlib.util.find_spec("streaming")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(str(exc)) from exc
        package = types.ModuleType("streaming")  # the writer itself needs neither torchvision nor torch
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["streaming"] = package
        writer = importlib.import_module("streaming.base.format.mds.writer").MDSWriter
        return writer, f"streaming.base imported directly: `import streaming` raised {type(exc).__name__}"


def mds_convert(writer_class: Any, shard_bytes: int, files: list[Path], fmt: str, out: Path) -> None:
    writer = None
    for path in files:
        for batch in read_batches(path, fmt):
            if writer is None:
                dtype = np.dtype(batch.schema.field("tokens").type.value_type.to_pandas_dtype()).name
                writer = writer_class(out=str(out), size_limit=shard_bytes,
                                      columns={"id": "int64", "text": "str", "tokens": f"ndarray:{dtype}"})
            for row in row_dicts(batch):
                writer.write(row)
    assert writer is not None
    writer.finish()


def litdata_items(item: tuple[str, str]) -> Iterator[dict[str, Any]]:
    """LitData's ``fn``: every row of one input file (module level, so spawned workers can import it)."""
    for batch in read_batches(Path(item[0]), item[1]):
        yield from row_dicts(batch)


def litdata_convert(shard_bytes: int, workers: int, files: list[Path], fmt: str, out: Path) -> None:
    optimize = importlib.import_module("litdata").optimize
    optimize(fn=litdata_items, inputs=[(str(p), fmt) for p in files], output_dir=str(out),
             chunk_bytes=shard_bytes, num_workers=workers, verbose=False, mode="overwrite")


def index_rows(key: str, count: str) -> Callable[[Path], int]:
    """Rows an MDS or LitData index.json records: the sum of ``count`` over its ``key`` entries."""
    return lambda out: sum(int(e[count]) for e in json.loads((out / "index.json").read_text())[key])


@dataclass
class Contender(harness.Contender):
    """One way to convert one input format: ``run(out)`` is timed, ``rows(out)`` (the check) is not."""

    fmt: str
    name: str
    run: Callable[[Path], object]
    rows: Callable[[Path], int]
    cpu_s: list[float] = field(default_factory=list)
    out_bytes: int = 0


def contenders(work: Workload, formats: list[str], shard_bytes: int, scratch: Path) -> list[Contender]:
    """Every contender for every input format; peers that do not import are skipped with the reason."""
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # else optimize() asks pypi.org each run
    os.environ.setdefault("DATA_OPTIMIZER_CACHE_FOLDER", str(scratch / "litdata-chunks"))
    os.environ.setdefault("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(scratch / "litdata-data"))
    mds, mds_note, mds_skip, lit_skip = None, "", "", ""
    try:
        mds, mds_note = load_mds_writer()
    except Exception as exc:  # noqa: BLE001 - whatever stops it importing is the reason in the table
        mds_skip = harness.reason(exc)
    try:  # imported here, untimed; it imports torch
        importlib.import_module("litdata")
    except Exception as exc:  # noqa: BLE001
        lit_skip = harness.reason(exc)
    if "torch" in sys.modules:  # the peers import torch; it computes nothing here
        sys.modules["torch"].set_num_threads(1)
    options = {w: ShardOptions(workers=w, shard_bytes=shard_bytes) for w in (1, 2)}
    found: list[Contender] = []
    for fmt in formats:
        files, src = work.files[fmt], str(work.files[fmt][0].parent)  # trainio gets the directory, as on the CLI
        found += [
            Contender(fmt, "trainio shard", partial(trainio_convert, src, fmt, options[1]), trainio_rows),
            Contender(fmt, "trainio shard --workers 2", partial(trainio_convert, src, fmt, options[2]), trainio_rows),
            Contender(fmt, "pyarrow -> ipc.new_file", partial(pyarrow_convert, files, fmt), pyarrow_rows,
                      note="the limit: no hash, no index"),
            Contender(fmt, "MosaicML MDSWriter", partial(mds_convert, mds, shard_bytes, files, fmt),
                      index_rows("shards", "samples"), note=mds_note, skip=mds_skip),
        ]
        found += [Contender(fmt, f"LitData optimize, {w} worker{'s' if w > 1 else ''}",
                            partial(litdata_convert, shard_bytes, w, files, fmt),
                            index_rows("chunks", "chunk_size"), skip=lit_skip) for w in (1, 2)]
    return found


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(found: list[Contender], work: Workload, out: Path, repeat: int) -> None:
    """Run every contender ``repeat`` times, the order reversed on odd repeats; check each output untimed."""
    for i in range(repeat):
        for c in harness.in_turn(found, i):
            if c.skip:
                continue
            shutil.rmtree(out, ignore_errors=True)
            harness.settle(sync=True)
            cpu, start = cpu_seconds(), time.perf_counter()
            try:
                c.run(out)
            except Exception as exc:  # a peer that fails is reported; trainio's failures abort the run
                if c.name.startswith("trainio"):
                    raise
                c.skip = harness.reason(exc, "failed", 160)
                continue
            c.seconds.append(time.perf_counter() - start)
            c.cpu_s.append(cpu_seconds() - cpu)
            rows = c.rows(out)
            if rows != work.rows:
                raise SystemExit(f"benchmark aborted: {c.name} ({c.fmt}) wrote {rows} rows, expected {work.rows}")
            c.out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            print(f"  {c.fmt:7} {c.name:28} {c.seconds[-1]:7.2f} s", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)


def machine(root: Path) -> dict[str, Any]:
    return {**harness.machine(VERSIONS), "local_dir": str(root)}


def summarize(c: Contender, work: Workload, baseline: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"input": c.fmt, "contender": c.name, "note": c.skip or c.note, "seconds": c.seconds}
    if c.seconds:
        median = statistics.median(c.seconds)
        row.update(rows_per_s=work.rows / median, mb_per_s=work.bytes[c.fmt] / median / 1e6,
                   cpu_s=statistics.median(c.cpu_s), cpu_seconds=c.cpu_s, out_gb=c.out_bytes / 1e9,
                   vs_pyarrow=baseline[c.fmt] / median if c.fmt in baseline else None)
    return row


def render(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [*harness.machine_lines(m, m['local_dir']),
             f"workload: {s['rows']} rows in {s['files']} files per format; "
             + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in s["input_bytes"].items())
             + f"; shards of {s['shard_bytes']} bytes; median of {s['repeat']}", ""]
    head = ["input", "contender", "rows/s", "MB/s", "CPU s", "out GB", "vs pyarrow", "note"]
    table = [head]
    for r in report["rows"]:
        if "rows_per_s" in r:
            ratio = "-" if r["vs_pyarrow"] is None else f"{r['vs_pyarrow']:.2f}"
            table.append([r["input"], r["contender"], f"{r['rows_per_s']:,.0f}", f"{r['mb_per_s']:.1f}",
                          f"{r['cpu_s']:.1f}", f"{r['out_gb']:.2f}", ratio, r["note"]])
        else:
            table.append([r["input"], r["contender"], "-", "-", "-", "-", "-", r["note"]])
    return harness.report_text(lines + harness.markdown_table(table, left=(0, 1, 7)), report["notes"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GB"), help="Parquet input size (1GB)")
    parser.add_argument("--files", type=int, default=8, help="input files per format (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender (default 3)")
    parser.add_argument("--shard-bytes", type=parse_size, default=256 << 20, help="shard size for all (256MiB)")
    parser.add_argument("--inputs", default="parquet,jsonl", help="input formats to convert (parquet,jsonl)")
    parser.add_argument("--local-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where inputs and outputs go (default: the temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: trainio against the peers; ray: trainio's local engine against its Ray engine")
    args = parser.parse_args(argv)
    formats = [f for f in args.inputs.split(",") if f]
    if args.repeat < 1 or args.size < 1 or args.files < 1 or not set(formats) <= {"parquet", "jsonl"}:
        parser.error("--repeat, --size and --files must be >= 1; --inputs takes parquet and/or jsonl")
    args.local_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="trainio-shard-bench-", dir=args.local_dir))
    try:
        started = time.perf_counter()
        work = make_workload(root, args.size, args.files)
        print(f"  wrote {work.rows} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        if args.engine == "ray":
            found = ray_contenders(work, formats, args.shard_bytes)
        else:
            found = contenders(work, formats, args.shard_bytes, root)
        info = machine(args.local_dir)
        measure(found, work, root / "out", args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    baseline = {c.fmt: statistics.median(c.seconds) for c in found if c.name.startswith("pyarrow") and c.seconds}
    settings = {"rows": work.rows, "files": args.files, "input_bytes": work.bytes, "repeat": args.repeat,
                "shard_bytes": args.shard_bytes, "batch_rows": BATCH_ROWS}
    report = {"machine": info, "settings": settings, "rows": [summarize(c, work, baseline) for c in found],
              "notes": NOTES}
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
