"""``trainio shard``: convert Parquet, JSON Lines, CSV, Arrow, raw files or a saved HF dataset into a dataset."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ._format import human_bytes, parse_size, print_json
from ._inputs import FORMATS, find_inputs
from ._progress import byte_bar
from ._sharding import ShardOptions, shard_files

EXAMPLES = """\
examples:
  trainio shard data/*.parquet --out /nvme/datasets/c4 --shard-size 256MB --workers 2
  trainio shard s3://corpus/raw/ --format jsonl --out s3://corpus/trainio/v1 --compression zstd
  trainio shard images/ --format files --out ./images-ds
  trainio shard train/ --format imagefolder --out ./train-ds       # train/<class>/<image>: label from the folder
  trainio shard text.jsonl --out ./ds --map mymodule:tokenize
  trainio shard s3://corpus/raw/ --out s3://corpus/ds --engine ray --ray-address auto
"""


def register(commands: Any) -> None:
    """Add the ``shard`` subcommand."""
    parser = commands.add_parser(
        "shard", help="convert files into a trainio dataset", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert files, directories or globs (local or s3://) into a sharded, hashed trainio "
                    "dataset. Inputs are streamed: memory stays bounded whatever their size.")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="file, directory or glob, local or s3://")
    parser.add_argument("--out", required=True, metavar="URL", help="where the dataset goes (path or s3:// URL)")
    parser.add_argument("--format", choices=FORMATS, help="input format (default: from the file extensions)")
    parser.add_argument("--shard-size", type=parse_size, default=256 << 20, metavar="SIZE",
                        help="close shard files at this size, e.g. 256MB or 1GiB (default 256 MiB)")
    parser.add_argument("--batch-rows", type=int, default=1024, metavar="N", help="rows per record batch (1024)")
    parser.add_argument("--compression", choices=("none", "lz4", "zstd"), default="none")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="processes converting in parallel (1)")
    parser.add_argument("--map", metavar="MODULE:FUNCTION",
                        help="call this on every record batch; it returns a RecordBatch, Table or dict of columns")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: this machine's processes (default); ray: a Ray Data cluster "
                             "(Parquet, JSON Lines or CSV inputs; pip install 'trainio[ray]')")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="the Ray cluster: auto, ray://host:10001 (default: a local Ray)")
    parser.add_argument("--shards-per-task", type=int, default=4, metavar="N",
                        help="with --engine ray: shards' worth of rows each task writes (4)")
    parser.add_argument("--json", action="store_true", help="print one JSON document and no progress")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Shard the inputs; print a summary (or JSON); 0 on success."""
    if args.batch_rows < 1:
        raise ValueError(f"--batch-rows {args.batch_rows}: must be >= 1")
    options = ShardOptions(
        shard_bytes=args.shard_size, batch_rows=args.batch_rows,
        compression=None if args.compression == "none" else args.compression,
        workers=args.workers, map=args.map, overwrite=args.overwrite)
    files = find_inputs(args.inputs, args.format)
    total = sum(f.size for f in files)
    started = time.perf_counter()
    if args.engine == "ray":
        index = _shard_on_ray(args, options)
    else:
        with byte_bar("shard", total, quiet=args.json) as advance:
            index = shard_files(files, args.out, options=options, progress=advance)
    seconds = time.perf_counter() - started
    size = sum(s.bytes for s in index.shards)
    summary = {"url": args.out, "engine": args.engine, "rows": index.rows, "shards": len(index.shards), "bytes": size,
               "input_bytes": total, "seconds": round(seconds, 3),
               "rows_per_s": round(index.rows / seconds, 1), "input_mb_per_s": round(total / seconds / 1e6, 1)}
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {index.rows:,} rows in {len(index.shards)} shards ({human_bytes(size)}) to {args.out} "
              f"in {seconds:.1f} s ({index.rows / seconds:,.0f} rows/s, {human_bytes(total / seconds)}/s of input)")
    return 0


def _shard_on_ray(args: argparse.Namespace, options: ShardOptions) -> Any:
    from ._ray_shard import ray_progress, shard_with_ray

    ray_progress(not args.json)
    return shard_with_ray(args.inputs, args.out, format=args.format, options=options, address=args.ray_address,
                          shards_per_task=args.shards_per_task)
