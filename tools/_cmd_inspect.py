"""``trainio inspect``: what a dataset holds."""

from __future__ import annotations

import argparse
from typing import Any

from trainio.loaders import Dataset

from ._format import human_bytes, json_value, print_json, short_value

EXAMPLES = """\
examples:
  trainio inspect /nvme/datasets/c4 --head 5
  trainio inspect s3://corpus/trainio/v1 --json
"""


def register(commands: Any) -> None:
    """Add the ``inspect`` subcommand."""
    parser = commands.add_parser(
        "inspect", help="show a dataset's schema, shards and first rows", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show the schema, row count, shards, sizes and compression of a dataset, "
                    "and its first rows as a table.")
    parser.add_argument("url", metavar="URL", help="the dataset (path or s3:// URL)")
    parser.add_argument("--head", type=int, default=5, metavar="N", help="rows to show (5)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print what the dataset holds; 0 on success."""
    ds = Dataset(args.url)
    head = [ds[i] for i in range(min(max(args.head, 0), len(ds)))]
    size = sum(s.bytes for s in ds.shards)
    if args.json:
        print_json({
            "url": ds.url, "rows": len(ds), "bytes": size, "compression": ds.index.compression,
            "created_by": ds.index.created_by,
            "schema": [{"name": f.name, "type": str(f.type)} for f in ds.schema],
            "shards": [{"path": s.path, "rows": s.rows, "bytes": s.bytes, "xxh3_128": s.xxh3_128,
                        "batches": len(s.batches)} for s in ds.shards],
            "head": [{k: json_value(v) for k, v in row.items()} for row in head],
        })
        return 0
    print(f"dataset      {ds.url}")
    print(f"rows         {len(ds):,}")
    print(f"shards       {len(ds.shards)} ({human_bytes(size)}, compression {ds.index.compression or 'none'})")
    print(f"created by   {ds.index.created_by}")
    print("schema")
    width = max((len(f.name) for f in ds.schema), default=0)
    for field in ds.schema:
        print(f"  {field.name:<{width}}  {field.type}")
    print("shards")
    for s in ds.shards[:20]:
        print(f"  {s.path}  {s.rows:,} rows  {human_bytes(s.bytes)}  {len(s.batches)} batches  xxh3 {s.xxh3_128[:12]}…")
    if len(ds.shards) > 20:
        print(f"  … and {len(ds.shards) - 20} more")
    if head:
        print(f"first {len(head)} rows")
        cells = [[short_value(row[name]) for name in ds.schema.names] for row in head]
        widths = [max(len(name), *(len(c[i]) for c in cells)) for i, name in enumerate(ds.schema.names)]
        print("  " + "  ".join(name.ljust(w) for name, w in zip(ds.schema.names, widths)))
        for c in cells:
            print("  " + "  ".join(v.ljust(w) for v, w in zip(c, widths)))
    return 0
